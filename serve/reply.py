"""Building /v1/analyze replies: map records from store rows, and per-sample error analysis."""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import orjson
import pandas as pd

from camscope.analysis import sample_errors, softmax
from serve.payload import encode_bytes

TOP = 5


def depth_for(depths: dict[str, int], connection: str | None) -> int:
    """A layer's depth as the reply states it: from ``connection`` when given, else its longest path."""
    return int(depths[connection]) if connection else int(max(depths.values()))


def stored_maps(rows: pd.DataFrame) -> dict[tuple[str, str, int], dict]:
    """A sample's store rows as ``(algorithm, layer, label) -> {depths, height, width, heatmap (uint8 bytes),
    scale}``; a layer's rows for several connections become one entry with a depth per connection."""
    maps: dict[tuple[str, str, int], dict] = {}
    columns = [rows[name].tolist() for name in
               ("algorithm", "layer", "label", "connection", "depth", "height", "width", "heatmap", "scale")]
    for algorithm, layer, label, connection, depth, height, width, heatmap, scale in zip(*columns):
        key = (algorithm, layer, int(label))
        if key not in maps:
            maps[key] = {"depths": {}, "height": int(height), "width": int(width),
                         "heatmap": bytes(heatmap), "scale": float(scale)}
        maps[key]["depths"][connection] = int(depth)
    return maps


def store_records(maps: dict[tuple[str, str, int], dict], algorithms: Sequence[str], layers: Sequence[str],
                  labels: Sequence[int], connection: str | None) -> list[dict] | None:
    """Map records (algorithm-major, then layer, then label) from :func:`stored_maps`, or None when
    the store lacks any requested map (the engine then computes them)."""
    records = []
    for algorithm in algorithms:
        for layer in layers:
            for label in labels:
                stored = maps.get((algorithm, layer, int(label)))
                if stored is None:
                    return None
                records.append({"algorithm": algorithm, "layer": layer,
                                "depth": depth_for(stored["depths"], connection), "label": int(label), **stored})
    return records


def stored_labels(maps: dict[tuple[str, str, int], dict]) -> list[int]:
    """The labels the store explained for a sample (its labels policy), ascending."""
    return sorted({label for _, _, label in maps})


def sample_analyses(logits: np.ndarray, gts: Sequence[int | None], label_names: Sequence[str]) -> list[dict | None]:
    """Error analysis of each sample of ``logits`` [N, C] whose ground truth is known (None where it is
    not): loss (cross-entropy), correctness, confidence, the ground truth's probability and the top
    predictions. One vectorised pass for the whole batch."""
    known = [i for i, gt in enumerate(gts) if gt is not None]
    analyses: list[dict | None] = [None] * len(gts)
    if not known:
        return analyses
    rows = np.asarray(logits, dtype=np.float64).reshape(len(gts), -1)[known]
    targets = [int(gts[i]) for i in known]
    errors = sample_errors(rows, targets, k=min(TOP, len(label_names)))
    probabilities = softmax(rows)
    for i, gt, error, row in zip(known, targets, errors, probabilities):
        analyses[i] = {
            "gt": gt,
            "gt_name": label_names[gt],
            "correct": error.correct,
            "loss": error.loss,
            "confidence": error.confidence,
            "gt_probability": float(row[gt]),
            "top": [list(pair) for pair in error.top_k],
        }
    return analyses


#: The media type of the binary /v1/analyze reply, for clients that send it in ``Accept``.
BINARY = "application/octet-stream"


def analyze_reply(request: dict, label_names: Sequence[str], logits: Sequence[float], probabilities: Sequence[float],
                  labels: Sequence[int], maps: list[dict], source: str, analysis: dict | None,
                  binary: bool = False) -> bytes:
    """The body of a /v1/analyze reply, encoded once where it is built so that large map lists cross
    no further serialisation. ``maps`` hold their ``heatmap`` as uint8 bytes; ``analysis`` is the
    sample's entry of :func:`sample_analyses`.

    JSON (see :class:`serve.schemas.AnalyzeReply`) carries each heatmap as base64; the binary reply
    (``binary=True``) is a 4-byte little-endian length N, then N bytes of the same JSON in which each
    map has ``offset`` and ``length`` instead of ``heatmap``, then every map's bytes back to back
    (offsets count from the end of the JSON): see :func:`serve.payload.decode_binary_reply`.
    """
    prediction = int(np.argmax(logits))
    reply = {
        "run": request["run"], "slice": request.get("slice"), "sample_id": request.get("sample_id"),
        "source": source, "prediction": prediction, "prediction_name": label_names[prediction],
        "probabilities": [float(p) for p in probabilities], "labels": [int(c) for c in labels], "maps": [],
        "analysis": analysis,
    }
    if not binary:
        reply["maps"] = [{**record, "heatmap": encode_bytes(record["heatmap"])} for record in maps]
        return orjson.dumps(reply)
    offset = 0
    for record in maps:
        size = len(record["heatmap"])
        reply["maps"].append({key: value for key, value in record.items() if key != "heatmap"}
                             | {"offset": offset, "length": size})
        offset += size
    header = orjson.dumps(reply)
    return b"".join([struct.pack("<I", len(header)), header, *(record["heatmap"] for record in maps)])
