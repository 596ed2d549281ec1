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

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from camscope.engine import CamEngine, Explanation
from camscope.graph import LayerInfo
from camscope.heatmap import dequantize, upsample
from camscope.metrics import top_fraction_drop
from camscope.project import Project
from camscope.store import FAITHFULNESS_SCHEMA, HEATMAP_SCHEMA, PROJECTION_COLUMNS, SAMPLE_SCHEMA

#: What ``camscope run --faithfulness`` stores per map (recorded in the store's metadata).
FAITHFULNESS_METRIC = {"metric": "top_fraction_drop", "fraction": 0.1, "baseline": "zeros", "label": "prediction"}
#: Maps scored per forward pass (each map costs two inputs: the sample and its perturbed copy).
FAITHFULNESS_CHUNK = 256

#: A first load at least this slow (wall seconds) has the rest of its batch loaded by a thread pool: for
#: a loader that copies from memory, the pool's hand-offs cost several times the loads themselves
#: (2.8 against 17 CPU ms per 64 demo samples with 8 threads).
POOL_ABOVE_S = 0.002

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
    """Load what loads: ``(batch or None, loaded ids, {failed id: one-line reason})``, in the order of
    ``sample_ids``. With ``threads`` > 1 the rest load concurrently when the first sample took
    :data:`POOL_ABOVE_S` or more (a loader that waits on storage), else one by one."""

    def attempt(sid: str):
        try:
            return load_one(project, slice, sid)
        except Exception as error:  # noqa: BLE001 - a user loader may raise anything; the job goes on
            return error

    ids = [str(sid) for sid in sample_ids]
    started = time.perf_counter()
    results = [attempt(sid) for sid in ids[:1]]
    if threads > 1 and len(ids) > 2 and time.perf_counter() - started >= POOL_ABOVE_S:
        with ThreadPoolExecutor(max_workers=min(threads, len(ids) - 1)) as pool:
            results += pool.map(attempt, ids[1:])
    else:
        results += [attempt(sid) for sid in ids[1:]]
    loaded = [sid for sid, result in zip(ids, results) if not isinstance(result, BaseException)]
    failed = {sid: failure_reason(result) for sid, result in zip(ids, results) if isinstance(result, BaseException)}
    samples = [result[0] for result in results if not isinstance(result, BaseException)]
    if not samples:
        return None, loaded, failed
    batch = {name: torch.from_numpy(np.stack([s[name] for s in samples]).astype(np.float32, copy=False))
             for name in project.connections}
    return batch, loaded, failed


@dataclass
class ExplainedBatch:
    """One engine call's result and what the store's rows need from it (see :func:`explain_batch`)."""

    run: str
    slice: str
    ids: list[str]
    gts: list[int]
    per_sample: list[list[int]]
    explanation: Explanation
    layers: list[LayerInfo]


def explain_batch(
    project: Project,
    run: str,
    slice: str,
    sample_ids: Sequence[str],
    engine: CamEngine | None = None,
    labels: Sequence[int] | None = None,
    algorithms: Sequence[str] | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> ExplainedBatch:
    """Explain samples of a slice with a run's model (the engine's part of :func:`explain_samples`;
    :func:`batch_rows` lays the result out as rows, e.g. on another thread)."""
    ids = [str(sid) for sid in sample_ids]
    engine = engine or CamEngine(project.model(run))
    inputs = inputs if inputs is not None else project.load_batch(slice, ids)
    gts = [project.ground_truth(slice, sid) for sid in ids]
    per_sample = _labels_per_sample(engine, inputs, gts, labels)
    union = sorted({label for chosen in per_sample for label in chosen})
    keyword = {} if algorithms is None else {"algorithms": tuple(algorithms)}
    explanation = engine.explain(inputs, labels=union, **keyword)
    return ExplainedBatch(run, slice, ids, gts, per_sample, explanation, list(engine.layers))


def batch_rows(batch: ExplainedBatch) -> tuple[pa.Table, pa.Table]:
    """``(heatmap_rows, sample_rows)`` of an explained batch (see :func:`explain_samples`)."""
    heatmaps = heatmap_rows(batch.layers, batch.explanation, batch.run, batch.slice, batch.ids, batch.per_sample)
    return heatmaps, sample_rows(batch.explanation, batch.run, batch.slice, batch.ids, batch.gts)


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
    return batch_rows(explain_batch(project, run, slice, sample_ids, engine, labels, algorithms, inputs))


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


def quantize_maps(maps: torch.Tensor, out: torch.Tensor | None = None, overwrite: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`camscope.heatmap.quantize` over ``[..., h, w]``: ``(uint8 [..., h, w], float32 scale [...])``.

    Same arithmetic as the scalar version (float64 ratio applied in float32), so bytes are identical.
    ``out``: a uint8 CPU tensor of the maps' shape to write the bytes into (then returned as its numpy view).
    ``overwrite``: ``maps`` (float32) may serve as the scratch space (saves a copy of every value).
    """
    values = maps.detach().float()
    values = values.clamp_min_(0) if overwrite else values.clamp_min(0)
    scale = values.amax(dim=(-2, -1))
    if not bool(torch.isfinite(scale).all()):  # NaN and inf count as 0, like the scalar version
        values = values.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        scale = values.amax(dim=(-2, -1))
    factor = torch.where(scale > 0, 255.0 / scale.double().clamp_min(1e-300), 0.0).float()
    values = values.mul_(factor[..., None, None]).round_()
    if values.device.type != "cpu":
        quantized = values.to(torch.uint8).cpu()
        return quantized.numpy() if out is None else out.copy_(quantized).numpy(), scale.cpu().numpy()
    # whole numbers 0..255: numpy's cast gives the same bytes as torch's, five times faster on CPU
    target = np.empty(values.shape, dtype=np.uint8) if out is None else out.numpy()
    np.copyto(target, values.numpy(), casting="unsafe")
    return target, scale.numpy()


def heatmap_rows(layers: Sequence[LayerInfo] | CamEngine, explanation: Explanation, run: str, slice: str,
                 ids: list[str], per_sample: list[list[int]]) -> pa.Table:
    """One row per (sample, connection, algorithm, layer, label) with the sample's chosen labels;
    a layer has rows for each connection it depends on (the depth is that connection's).

    Built in one pass per batch: every (algorithm, layer) is quantized in bulk straight into one byte
    buffer shared by the heatmap column, and the key columns are dictionary-encoded (a few distinct
    values and integer indices), cast to the store's plain strings once at the end.
    """
    layers = list(layers.layers) if isinstance(layers, CamEngine) else list(layers)
    positions = {label: k for k, label in enumerate(explanation.labels)}
    sample_index, label_index = _pairs(per_sample, positions)
    pieces = [(algorithm, info, connection, depth) for algorithm in explanation.maps for info in layers
              for connection, depth in info.depth.items()]
    count = len(sample_index)
    if not count or not pieces:
        return HEATMAP_SCHEMA.empty_table()
    shapes = [_map_shape(explanation.maps[algorithm][info.name]) for algorithm, info, _, _ in pieces]
    heatmap, scale = _quantized_pieces(explanation, pieces, shapes, sample_index, label_index)
    algorithms = list(explanation.maps)
    names = [info.name for info in layers]
    connections = sorted({connection for _, _, connection, _ in pieces})
    per_piece = {  # one value per piece, repeated over its rows
        "algorithm": [algorithms.index(algorithm) for algorithm, _, _, _ in pieces],
        "layer": [names.index(info.name) for _, info, _, _ in pieces],
        "connection": [connections.index(connection) for _, _, connection, _ in pieces],
        "depth": [depth for _, _, _, depth in pieces],
        "height": [h for h, _ in shapes],
        "width": [w for _, w in shapes],
    }
    rows = {key: np.repeat(np.asarray(values, dtype=np.int64), count) for key, values in per_piece.items()}
    total = count * len(pieces)
    table = pa.table({
        "run": _dictionary([run], np.zeros(total, dtype=np.int32)),
        "slice": _dictionary([slice], np.zeros(total, dtype=np.int32)),
        "sample_id": _dictionary(ids, np.tile(sample_index, len(pieces))),
        "connection": _dictionary(connections, rows["connection"]),
        "algorithm": _dictionary(algorithms, rows["algorithm"]),
        "layer": _dictionary(names, rows["layer"]),
        "depth": rows["depth"],
        "label": np.tile(np.asarray(explanation.labels, dtype=np.int64)[label_index], len(pieces)),
        "height": rows["height"],
        "width": rows["width"],
        "heatmap": heatmap,
        "scale": pa.array(scale, pa.float32()),
    })
    return table.cast(HEATMAP_SCHEMA)


def _map_shape(maps: torch.Tensor) -> tuple[int, int]:
    """``(height, width)`` of a layer's stored maps: a 1-D layer's ``[B, K, L]`` maps are rows of height 1."""
    return (1, maps.shape[-1]) if maps.dim() == 3 else (maps.shape[-2], maps.shape[-1])


def _quantized_pieces(explanation: Explanation, pieces: list[tuple], shapes: list[tuple[int, int]],
                      sample_index: np.ndarray, label_index: np.ndarray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """``(heatmap column, scales)`` of every piece's rows, in one buffer: each (algorithm, layer) is
    quantized once (:func:`quantize_groups`); its rows for a second connection are a copy of its bytes."""
    count = len(sample_index)
    sizes = [count * h * w for h, w in shapes]
    buffer = np.empty(sum(sizes), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    scales = np.empty(count * len(pieces), dtype=np.float32)
    selection = _selection(sample_index, label_index, len(explanation.logits), len(explanation.labels))
    pairs = list(dict.fromkeys((algorithm, info.name) for algorithm, info, _, _ in pieces))
    quantized = quantize_groups(explanation.maps, pairs, selection)
    for p, (algorithm, info, _, _) in enumerate(pieces):
        values, row_scales = quantized[(algorithm, info.name)]
        buffer[starts[p] : starts[p + 1]] = values.reshape(-1)
        scales[p * count : (p + 1) * count] = row_scales.reshape(-1)
    chunks = [_binary_column(buffer[starts[p] : starts[p + 1]].reshape(count, -1)) for p in range(len(pieces))]
    return pa.chunked_array(chunks, pa.binary()), scales


def quantize_groups(maps: dict[str, dict[str, torch.Tensor]], pairs: Sequence[tuple[str, str]],
                    selection: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """``(algorithm, layer) -> (uint8 [B, K, h, w], float32 scales [B, K])`` (``[rows, ...]`` with a
    ``selection`` from :func:`_selection`): the maps of one shape are quantized in one call, since
    per-map calls cost about as much as the engine; a 1-D layer's maps ``[B, K, L]`` get height 1."""
    by_shape: dict[tuple[int, ...], list[tuple[str, str]]] = {}
    for algorithm, name in pairs:
        by_shape.setdefault(tuple(maps[algorithm][name].shape), []).append((algorithm, name))
    quantized = {}
    for members in by_shape.values():
        stacked = torch.stack([_selected(maps[algorithm][name], selection) for algorithm, name in members])
        values, scales = quantize_maps(stacked, overwrite=True)
        quantized.update({pair: (values[i], scales[i]) for i, pair in enumerate(members)})
    return quantized


def _selected(maps: torch.Tensor, selection: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """A layer's maps as ``[B, K, h, w]`` (a 1-D layer's with height 1), or the ``selection``'s rows."""
    maps = maps.unsqueeze(-2) if maps.dim() == 3 else maps
    return maps if selection is None else maps[selection]


def _selection(sample_index: np.ndarray, label_index: np.ndarray, batch: int, labels: int
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Index tensors picking the rows ``(sample_index[i], label_index[i])`` from maps ``[batch, labels, ...]``,
    or None when the rows are every label of every sample in order (no copy needed)."""
    every = len(sample_index) == batch * labels and np.array_equal(sample_index, np.repeat(np.arange(batch), labels))
    if every and np.array_equal(label_index, np.tile(np.arange(labels), batch)):
        return None
    return torch.from_numpy(sample_index), torch.from_numpy(label_index)


def _dictionary(values: Sequence[str], indices: np.ndarray) -> pa.DictionaryArray:
    """A dictionary-encoded string column: ``values[indices[i]]`` for each row."""
    return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32, copy=False)),
                                          pa.array(list(values), pa.string()))


def _pairs(per_sample: list[list[int]], positions: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(sample index, label position) of every row, sample-major."""
    samples = [b for b, chosen in enumerate(per_sample) for _ in chosen]
    labels = [positions[label] for chosen in per_sample for label in chosen]
    return np.asarray(samples, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def _binary_column(rows: np.ndarray) -> pa.Array:
    """A binary array whose i-th value is the bytes of ``rows[i]`` (a view of ``rows``' memory, no copy)."""
    count, size = rows.shape
    offsets = np.arange(count + 1, dtype=np.int32) * size
    data = pa.py_buffer(np.ascontiguousarray(rows))
    return pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), data])


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
