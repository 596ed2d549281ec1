"""From samples to store rows: explain a batch of a project's samples and lay the result out as the
contract's heatmap rows and sample rows (pyarrow tables). Pure: no Ray, no files.

Examples:
    >>> heatmaps, samples = explain_samples(project, "cnn", "validation", ["4000", "4001"])
    >>> heatmaps.column_names[:4]
    ['run', 'slice', 'sample_id', 'connection']
    >>> samples.num_rows
    2
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from camscope.engine import CamEngine, Explanation
from camscope.heatmap import dequantize, upsample
from camscope.metrics import top_fraction_drop
from camscope.project import Project
from camscope.store import FAITHFULNESS_SCHEMA, HEATMAP_SCHEMA, PROJECTION_COLUMNS, SAMPLE_SCHEMA

#: What ``camscope run --faithfulness`` stores per map (recorded in the store's metadata).
FAITHFULNESS_METRIC = {"metric": "top_fraction_drop", "fraction": 0.1, "baseline": "zeros", "label": "prediction"}
#: Maps scored per forward pass (each map costs two inputs: the sample and its perturbed copy).
FAITHFULNESS_CHUNK = 256

#: Projects with at most this many classes get maps for every label; larger ones for the top-k + ground truth.
MAX_ALL_LABELS = 20
TOP_K = 5


def labels_policy(num_classes: int) -> dict:
    """The labels policy for a model with ``num_classes`` outputs, as stated in the store's metadata."""
    if num_classes <= MAX_ALL_LABELS:
        return {"mode": "all", "max_all_labels": MAX_ALL_LABELS}
    return {"mode": "top_k", "k": TOP_K, "ground_truth": True, "max_all_labels": MAX_ALL_LABELS}


def sample_labels(probabilities: torch.Tensor, ground_truth: Sequence[int]) -> list[list[int]]:
    """The labels explained for each sample under :func:`labels_policy` (sorted class indices)."""
    num_classes = probabilities.shape[-1]
    if num_classes <= MAX_ALL_LABELS:
        return [list(range(num_classes)) for _ in ground_truth]
    top = probabilities.topk(TOP_K, dim=-1).indices.cpu().tolist()
    return [sorted({*row, int(gt)}) for row, gt in zip(top, ground_truth)]


def load_one(project: Project, slice: str, sample_id: str) -> tuple[dict[str, np.ndarray], int]:
    """One checked sample and its ground truth; ValueError when it is not finite in float32 (the
    models' dtype), ProjectError for a wrong shape, whatever the loader raises otherwise."""
    sample = project.sample(slice, sample_id)
    gt = project.ground_truth(slice, sample_id)
    for name, array in sample.items():
        if not np.isfinite(np.asarray(array, dtype=np.float32)).all():
            raise ValueError(f"connection {name!r} holds values that are not finite in float32")
    return sample, gt


def failure_reason(error: BaseException) -> str:
    """A one-line reason for a failed sample: the error's type and first 300 characters."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def load_available(project: Project, slice: str, sample_ids: Sequence[str], threads: int = 1
                   ) -> tuple[dict[str, torch.Tensor] | None, list[str], dict[str, str]]:
    """Load what loads: ``(batch or None, loaded ids, {failed id: one-line reason})``; ``threads`` > 1
    loads concurrently (a loader that waits on storage), keeping the order of ``sample_ids``."""

    def attempt(sid: str):
        try:
            return load_one(project, slice, sid)
        except Exception as error:  # noqa: BLE001 - a user loader may raise anything; the job goes on
            return error

    ids = [str(sid) for sid in sample_ids]
    if threads > 1 and len(ids) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(threads, len(ids))) as pool:
            results = list(pool.map(attempt, ids))
    else:
        results = [attempt(sid) for sid in ids]
    loaded = [sid for sid, result in zip(ids, results) if not isinstance(result, BaseException)]
    failed = {sid: failure_reason(result) for sid, result in zip(ids, results) if isinstance(result, BaseException)}
    samples = [result[0] for result in results if not isinstance(result, BaseException)]
    if not samples:
        return None, loaded, failed
    batch = {name: torch.from_numpy(np.stack([s[name] for s in samples]).astype(np.float32, copy=False))
             for name in project.connections}
    return batch, loaded, failed


def explain_samples(
    project: Project,
    run: str,
    slice: str,
    sample_ids: Sequence[str],
    engine: CamEngine | None = None,
    labels: Sequence[int] | None = None,
    algorithms: Sequence[str] | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Explain samples of a slice with a run's model and return the store's rows.

    Args:
        project: the project.
        run, slice: names of the model run and the data slice.
        sample_ids: the samples, in order.
        engine: a :class:`CamEngine` over ``project.model(run)``; built when omitted.
        labels: class indices to explain for every sample; ``None`` = the labels policy.
        algorithms: algorithm keys; ``None`` = all three.
        inputs: the already loaded batch of ``sample_ids`` (``project.load_batch`` when omitted).

    Returns:
        ``(heatmap_rows, sample_rows)`` with the contract's columns (``HEATMAP_SCHEMA``,
        ``SAMPLE_SCHEMA``); ``x`` and ``y`` are NaN until the job projects the population.
    """
    ids = [str(sid) for sid in sample_ids]
    engine = engine or CamEngine(project.model(run))
    inputs = inputs if inputs is not None else project.load_batch(slice, ids)
    gts = [project.ground_truth(slice, sid) for sid in ids]
    per_sample = _labels_per_sample(engine, inputs, gts, labels)
    union = sorted({label for chosen in per_sample for label in chosen})
    keyword = {} if algorithms is None else {"algorithms": tuple(algorithms)}
    explanation = engine.explain(inputs, labels=union, **keyword)
    heatmaps = heatmap_rows(engine, explanation, run, slice, ids, per_sample)
    return heatmaps, sample_rows(explanation, run, slice, ids, gts)


def _labels_per_sample(engine: CamEngine, inputs: dict[str, torch.Tensor], gts: list[int],
                       labels: Sequence[int] | None) -> list[list[int]]:
    if labels is not None:
        return [sorted({int(label) for label in labels}) for _ in gts]
    num_classes = engine.num_classes
    if num_classes is not None and num_classes <= MAX_ALL_LABELS:
        return [list(range(num_classes)) for _ in gts]
    # Many classes: a gradient-free forward pass picks each sample's top-k before the explanation.
    with torch.no_grad():
        device = next(engine.model.parameters()).device
        logits = engine.model(**{name: tensor.to(device) for name, tensor in inputs.items()})
    return sample_labels(logits.float().softmax(dim=-1), gts)


def quantize_maps(maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`camscope.heatmap.quantize` over ``[..., h, w]``: ``(uint8 [..., h, w], float32 scale [...])``.

    Same arithmetic as the scalar version (float64 ratio applied in float32), so bytes are identical.
    """
    values = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min_(0)  # one copy
    scale = values.amax(dim=(-2, -1))
    factor = torch.where(scale > 0, 255.0 / scale.double().clamp_min(1e-300), 0.0).float()
    quantized = values.mul_(factor[..., None, None]).round_().to(torch.uint8)
    return quantized.cpu().numpy(), scale.cpu().numpy()


def heatmap_rows(engine: CamEngine, explanation: Explanation, run: str, slice: str, ids: list[str],
                 per_sample: list[list[int]]) -> pa.Table:
    """One row per (sample, connection, algorithm, layer, label) with the sample's chosen labels;
    a layer has rows for each connection it depends on (the depth is that connection's)."""
    positions = {label: k for k, label in enumerate(explanation.labels)}
    sample_index, label_index = _pairs(per_sample, positions)
    labels = np.asarray(explanation.labels, dtype=np.int64)[label_index]
    sample_column = np.asarray(ids, dtype=object)[sample_index]
    pieces = []
    for algorithm, by_layer in explanation.maps.items():
        for info in engine.layers:
            maps = by_layer[info.name]
            # a 1-D layer's maps [B, K, L] are stored as rows of height 1
            quantized, scale = quantize_maps(maps.unsqueeze(-2) if maps.dim() == 3 else maps)  # [B, K, h, w], [B, K]
            height, width = quantized.shape[-2:]
            chosen = quantized[sample_index, label_index].reshape(len(sample_index), height * width)
            binary = _binary_column(chosen)
            for connection, depth in info.depth.items():
                pieces.append(pa.table({
                    "run": pa.array([run] * len(sample_index), pa.string()),
                    "slice": pa.array([slice] * len(sample_index), pa.string()),
                    "sample_id": pa.array(sample_column, pa.string()),
                    "connection": pa.array([connection] * len(sample_index), pa.string()),
                    "algorithm": pa.array([algorithm] * len(sample_index), pa.string()),
                    "layer": pa.array([info.name] * len(sample_index), pa.string()),
                    "depth": np.full(len(sample_index), depth, dtype=np.int64),
                    "label": labels,
                    "height": np.full(len(sample_index), height, dtype=np.int64),
                    "width": np.full(len(sample_index), width, dtype=np.int64),
                    "heatmap": binary,
                    "scale": pa.array(scale[sample_index, label_index], pa.float32()),
                }, schema=HEATMAP_SCHEMA))
    return pa.concat_tables(pieces) if pieces else HEATMAP_SCHEMA.empty_table()


def _pairs(per_sample: list[list[int]], positions: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(sample index, label position) of every row, sample-major."""
    samples = [b for b, chosen in enumerate(per_sample) for _ in chosen]
    labels = [positions[label] for chosen in per_sample for label in chosen]
    return np.asarray(samples, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def _binary_column(rows: np.ndarray) -> pa.Array:
    """A binary array whose i-th value is the bytes of ``rows[i]`` (one copy, no Python bytes objects)."""
    count, size = rows.shape
    offsets = np.arange(count + 1, dtype=np.int32) * size
    data = pa.py_buffer(np.ascontiguousarray(rows).tobytes())
    return pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets.tobytes()), data])


def sample_rows(explanation: Explanation, run: str, slice: str, ids: list[str], gts: list[int]) -> pa.Table:
    """One row per sample: ground truth, prediction, confidence, loss, embedding; x, y and the
    projection columns = NaN."""
    logits = explanation.logits.float().cpu()
    probabilities = explanation.probabilities.float().cpu()
    confidence, prediction = probabilities.max(dim=-1)
    gt = torch.as_tensor(gts, dtype=torch.int64)
    loss = torch.nn.functional.cross_entropy(logits, gt, reduction="none")
    embedding = (explanation.embedding if explanation.embedding is not None else logits).float().cpu().numpy()
    offsets = np.arange(len(ids) + 1, dtype=np.int32) * embedding.shape[1]
    nan = np.full(len(ids), np.nan, dtype=np.float32)
    return pa.table({
        "run": pa.array([run] * len(ids), pa.string()),
        "slice": pa.array([slice] * len(ids), pa.string()),
        "sample_id": pa.array(ids, pa.string()),
        "gt": gt.numpy(),
        "prediction": prediction.numpy().astype(np.int64),
        "confidence": confidence.numpy().astype(np.float32),
        "loss": loss.numpy().astype(np.float32),
        "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(embedding.reshape(-1), pa.float32())),
        "x": nan,
        "y": nan,
        **{name: nan for name in PROJECTION_COLUMNS},
    }, schema=SAMPLE_SCHEMA)


def population_rows(engine: CamEngine, inputs: dict[str, torch.Tensor], run: str, slice: str, ids: list[str],
                    gts: list[int]) -> pa.Table:
    """Sample rows (prediction, confidence, loss, embedding) from the cheapest explain that still
    yields the embedding: one label, GradCAM only. Projections are NaN until the job adds them."""
    explanation = engine.explain(inputs, labels=[0], algorithms=("gradcam",))
    return sample_rows(explanation, run, slice, ids, gts)


def faithfulness_rows(model: torch.nn.Module, inputs: dict[str, torch.Tensor], heatmaps: pa.Table,
                      samples: pa.Table, fraction: float = FAITHFULNESS_METRIC["fraction"],
                      chunk: int = FAITHFULNESS_CHUNK) -> pa.Table:
    """Per-map faithfulness of each sample's predicted label: :func:`camscope.metrics.top_fraction_drop`
    of every stored map (dequantized, upsampled to its connection's input), the other connections held fixed.

    Args:
        model: the run's model (its device is used).
        inputs: the block's batch, {connection: [B, C, H, W]}, in the order of ``samples``.
        heatmaps, samples: :func:`explain_samples`'s tables for that batch.
        fraction: share of the input's pixels (the map's hottest) replaced by zeros.
        chunk: maps per forward pass (the pass holds ``2 * chunk`` inputs).

    Returns:
        ``FAITHFULNESS_SCHEMA`` rows: one per (sample, connection, algorithm, layer) of the predicted label.
    """
    ids = samples.column("sample_id").to_pylist()
    prediction = dict(zip(ids, samples.column("prediction").to_pylist()))
    position = {sid: b for b, sid in enumerate(ids)}
    frame = heatmaps.select(["run", "slice", "sample_id", "connection", "algorithm", "layer", "label", "height",
                             "width", "heatmap", "scale"]).to_pandas()
    frame = frame[frame["label"].to_numpy() == frame["sample_id"].map(prediction).to_numpy()].reset_index(drop=True)
    if frame.empty:
        return FAITHFULNESS_SCHEMA.empty_table()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = {name: tensor.to(device) for name, tensor in inputs.items()}
    scores = np.full(len(frame), np.nan, dtype=np.float32)
    for connection, rows in frame.groupby("connection", sort=False):
        x_all = batch[connection]
        one_d = x_all.dim() == 3  # a 1-D connection [B, C, L] is perturbed as [B, C, 1, L]
        x_all = x_all.unsqueeze(-2) if one_d else x_all
        height, width = x_all.shape[-2:]
        for start in range(0, len(rows), chunk):
            part = rows.iloc[start : start + chunk]
            index = torch.as_tensor([position[sid] for sid in part["sample_id"]], device=device)
            heat = np.stack([upsample(dequantize(row.heatmap, row.scale, (int(row.height), int(row.width))),
                                      (height, width)) for row in part.itertuples()])
            others = {name: tensor[index].repeat(2, *([1] * (tensor.dim() - 1)))
                      for name, tensor in batch.items() if name != connection}

            def forward(values: torch.Tensor, others=others, connection=connection, one_d=one_d) -> torch.Tensor:
                values = values.squeeze(-2) if one_d else values
                return model(**{connection: values}, **others)  # one pass: the sample and its perturbed copy

            drop = top_fraction_drop(forward, x_all[index], heat, part["label"].tolist(), fraction=fraction,
                                     batch_size=2 * len(part))
            scores[part.index.to_numpy()] = drop.float().cpu().numpy()
    return pa.table({
        **{name: pa.array(frame[name].tolist(), pa.string())
           for name in ("run", "slice", "sample_id", "connection", "algorithm", "layer")},
        "label": frame["label"].to_numpy(np.int64),
        "score": pa.array(scores, pa.float32()),
    }, schema=FAITHFULNESS_SCHEMA)
