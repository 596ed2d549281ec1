"""One model run inside the ingress replica: the run's model, a :class:`CamEngine` and the batching.

The ingress holds one :class:`ModelWorker` per run in its own process, so a request makes no hop
beyond the HTTP server. Concurrent requests meet in :meth:`ModelWorker.analyze`, batched by a
:class:`~serve.batcher.Batcher`: one forward and one (label-vectorised) backward serve them all, each
reply then takes its own labels, algorithms and layers out of the shared result. A request the engine refuses
fails alone: the batch is retried one request at a time, and only the refused one gets its error.
"""

from __future__ import annotations

import asyncio
import threading
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from camscope.analysis import project_2d
from camscope.engine import CamEngine
from camscope.project import load_project
from camscope.rows import MAX_ALL_LABELS, quantize_groups, sample_labels, sample_rows
from serve.batcher import Batcher
from serve.errors import BadRequest
from serve.reply import analyze_reply, depth_for, sample_analyses

#: Most requests that share one engine call, and how long a batch waits for them under concurrent
#: load (a lone request never waits; see serve/batcher.py).
MAX_BATCH = 8
BATCH_WAIT_S = 0.01
SUMMARY_CHUNK = 64


class ModelWorker:
    """One model run: explains batches of samples and summarises slices.

    Args:
        project_spec: ``module:attribute`` of the project (imported in the replica).
        run: the model run this replica holds.
        batch_wait_s: how long a batch waits for more requests (default :data:`BATCH_WAIT_S`).
    """

    def __init__(self, project_spec: str, run: str, batch_wait_s: float = BATCH_WAIT_S) -> None:
        self.project = load_project(project_spec)
        self.run = run
        model = self.project.model(run)
        if torch.cuda.is_available():
            model = model.cuda()
        first = next(iter(self.project.slices.values()))
        example = self.project.load_batch(first.name, first.sample_ids[:1])
        self.engine = CamEngine(model, example=example)
        self.device = str(next(model.parameters()).device)
        self.dtype = next(model.parameters()).dtype
        self._depths = {info.name: dict(info.depth) for info in self.engine.layers}
        self._summaries: dict[str, dict[str, Any]] = {}
        # One model use at a time: the engine's capture hooks would also see a concurrent forward.
        self._model_lock = threading.Lock()
        self._explainer = Batcher(partial(_isolated, self._explain_batch), MAX_BATCH, batch_wait_s)
        self._predictor = Batcher(partial(_isolated, self._predict_batch), MAX_BATCH, batch_wait_s)

    def set_batch_wait(self, seconds: float) -> None:
        """How long a batch waits for more requests under concurrent load (:class:`~serve.batcher.Batcher`)."""
        self._explainer.wait_s = self._predictor.wait_s = seconds

    def describe(self) -> dict:
        """What the ingress validates requests against: classes, connections and layers."""
        return {
            "run": self.run,
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_classes": int(self.engine.num_classes),
            "connections": list(self.engine.connections),
            "layers": [{"name": info.name, "depth": dict(info.depth), "shape": list(info.shape)}
                       for info in self.engine.layers],
        }

    async def analyze(self, job: dict) -> bytes:
        """The finished JSON body of /v1/analyze for one job, computed in a batch with concurrent jobs.

        A job is ``{"request": {"run", "slice", "sample_id"}, "inputs": {connection: float array}, "labels":
        list[int] | None, "gt": int | None, "algorithms": [...], "layers": [...], "connection": str | None,
        "binary": bool}`` (the binary reply of :func:`serve.reply.analyze_reply` when true).

        Raises:
            BadRequest: the engine refused this job's input (a ValueError), whatever its neighbours were.
        """
        return await self._explainer.submit(job)

    async def predict(self, sample: dict[str, np.ndarray]) -> dict:
        """``{"logits", "probabilities"}`` of one sample (a forward pass only: the store fast path)."""
        return await self._predictor.submit(sample)

    async def summary(self, slice: str) -> dict[str, Any]:
        """Every sample of a slice with ground truth, prediction, confidence, loss, embedding and a 2-D
        projection (x, y): the sample list when no store holds the slice. Computed once, then cached."""
        if slice not in self._summaries:
            self._summaries[slice] = await asyncio.to_thread(self._summarise, slice)
        return self._summaries[slice]

    # ----------------------------------------------------------------------------- internals
    def _explain_batch(self, jobs: list[dict]) -> list[bytes]:
        inputs = {name: torch.from_numpy(np.stack([job["inputs"][name] for job in jobs]))
                  for name in self.engine.connections}
        per_job = self._job_labels(jobs, inputs)
        union = sorted({label for labels in per_job for label in labels})
        algorithms = list(dict.fromkeys(a for job in jobs for a in job["algorithms"]))
        with self._model_lock:
            explanation = self.engine.explain(inputs, labels=union, algorithms=algorithms)
        position = {label: k for k, label in enumerate(explanation.labels)}
        logits = explanation.logits.float().cpu().numpy()
        probabilities = explanation.probabilities.float().cpu().numpy()
        pairs = list(dict.fromkeys((a, name) for job in jobs for a in job["algorithms"] for name in job["layers"]))
        quantized = quantize_groups(explanation.maps, pairs)
        analyses = sample_analyses(logits, [job["gt"] for job in jobs], self.project.label_names)
        return [
            analyze_reply(job["request"], self.project.label_names, logits[b], probabilities[b], labels,
                          self._records(quantized, b, job, labels, position), "engine", analyses[b],
                          job.get("binary", False))
            for b, (job, labels) in enumerate(zip(jobs, per_job))
        ]

    def _predict_batch(self, samples: list[dict[str, np.ndarray]]) -> list[dict]:
        inputs = {name: torch.from_numpy(np.stack([s[name] for s in samples])).to(self.device, self.dtype)
                  for name in self.engine.connections}
        with self._model_lock, torch.no_grad():
            logits = self.engine.model(**inputs).float()
        probabilities = logits.softmax(dim=-1).cpu().numpy()
        return [{"logits": row.tolist(), "probabilities": p.tolist()} for row, p in zip(logits.cpu().numpy(), probabilities)]

    def _job_labels(self, jobs: list[dict], inputs: dict[str, torch.Tensor]) -> list[list[int]]:
        """Each job's labels; a job without any gets the labels policy (all, or top-k + ground truth)."""
        classes = int(self.engine.num_classes)
        if all(job["labels"] is not None for job in jobs) or classes <= MAX_ALL_LABELS:
            return [list(job["labels"]) if job["labels"] is not None else list(range(classes)) for job in jobs]
        with self._model_lock, torch.no_grad():
            logits = self.engine.model(**{name: t.to(self.device) for name, t in inputs.items()})
        policy = sample_labels(logits.float().softmax(dim=-1), [job.get("gt") or 0 for job in jobs])
        return [list(job["labels"]) if job["labels"] is not None else chosen for job, chosen in zip(jobs, policy)]

    def _records(self, quantized: dict, b: int, job: dict, labels: list[int], position: dict[int, int]) -> list[dict]:
        """The reply's map records of batch item ``b`` (algorithm-major, then layer, then label) from
        :func:`camscope.rows.quantize_groups`."""
        rows = [position[label] for label in labels]
        records = []
        for algorithm in job["algorithms"]:
            for name in job["layers"]:
                values, scales = quantized[(algorithm, name)]
                depths = self._depths[name]
                depth = depth_for(depths, job["connection"])
                height, width = int(values.shape[-2]), int(values.shape[-1])
                for label, k in zip(labels, rows):
                    records.append({"algorithm": algorithm, "layer": name, "depth": depth, "depths": depths,
                                    "label": int(label), "height": height, "width": width,
                                    "heatmap": values[b, k].tobytes(), "scale": float(scales[b, k])})
        return records

    def _summarise(self, slice: str) -> dict[str, Any]:
        ids = list(self.project.slice(slice).sample_ids)
        tables = []
        for start in range(0, len(ids), SUMMARY_CHUNK):
            chunk = ids[start:start + SUMMARY_CHUNK]
            inputs = self.project.load_batch(slice, chunk)
            gts = [self.project.ground_truth(slice, sid) for sid in chunk]
            # One label and one algorithm: the cheapest explain that still yields the embedding.
            with self._model_lock:
                explanation = self.engine.explain(inputs, labels=[0], algorithms=("gradcam",))
            tables.append(sample_rows(explanation, self.run, slice, chunk, gts).to_pandas())
        frame = pd.concat(tables, ignore_index=True).drop(columns=["run", "slice"])
        embedding = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
        points = project_2d(embedding)
        frame["x"], frame["y"] = points[:, 0], points[:, 1]
        return {"frame": frame, "embedding": embedding}


def _isolated(compute, items: list) -> list:
    """``compute(items)``, or, when the batch fails, each item alone with its own result or error, so
    that no item fails a neighbour."""
    try:
        return compute(items)
    except Exception as error:  # noqa: BLE001: handed to the request it belongs to
        if len(items) == 1:
            return [_refusal(error)]
    return [_alone(compute, item) for item in items]


def _alone(compute, item):
    try:
        return compute([item])[0]
    except Exception as error:  # noqa: BLE001
        return _refusal(error)


def _refusal(error: Exception) -> Exception:
    """The engine's ValueError is the request's fault (a 4xx with its reason); anything else is the server's."""
    if isinstance(error, ValueError):
        return BadRequest(f"the model cannot take this input: {error}")
    return error

