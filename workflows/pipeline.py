"""The Ray Data pipeline of ``camscope run``: work items stream to a pool of explanation actors, and
loading overlaps with computing. GPU actors are fed by a loading stage of CPU tasks (the node's other
cores load while the GPU computes); CPU actors load their own items, since a loading task's process
imports torch and the project a second time and every shard's tensors pass through Ray's object
store, which cost a 2-core node a tenth of the job (5,000 demo samples, alternating runs: 33.3 and
32.9 s with loading tasks, 28.7 and 30.4 s without). An actor runs two calls at once, so one loads
while the other computes, and a slow loader's samples load several at a time
(:func:`camscope.rows.load_available`).

Work items are rows of one dataset: ``kind`` "maps" (one shard of the store's fixed grid: explain,
quantize and commit it; only a small summary row comes back, the maps never enter Ray's object store,
plus the shard's population rows when its slice needs a samples table) or "samples" (a chunk of the
slice that no "maps" item explains, for the population table: one cheap explain per chunk). Population
rows come back to the driver as Arrow IPC bytes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from camscope import store
from camscope.demo_data import cache_dir
from camscope.engine import CamEngine
from camscope.project import Project, load_project
from camscope.rows import (batch_rows, explain_batch, failure_reason, faithfulness_rows, load_available,
                           population_rows)

#: CPU share of one loading task (GPU jobs), and the loads one item runs at once (a loader waits on storage).
LOAD_CPUS = 0.25
LOAD_THREADS = 8
#: Actors one loading task feeds: each task runs in a worker process that imports the project (torch
#: and the model code, seconds of CPU), so more of them cost a small node more than the loads themselves.
ACTORS_PER_LOADER = 4
MAPS, SAMPLES = "maps", "samples"
#: Most CPU actors the default pool starts: each holds the model and torch's few hundred MB, so a big
#: node gets fewer actors with more threads each rather than one per core.
MAX_DEFAULT_CPU_ACTORS = 16
#: The population stage explains one label with one algorithm: it takes this many engine batches at once.
POPULATION_BATCHES = 4
#: Items one actor works on at once: one computes on the engine while the other's rows are laid out
#: and committed (Parquet encoding and the storage round trip overlap the next shard's compute).
CALLS_PER_ACTOR = 2
#: Where, under the node's camscope cache (``$CAMSCOPE_CACHE`` or ~/.cache/camscope), the engines
#: keep the gradient-strategy probe's choices (:mod:`camscope.strategy_cache`).
STRATEGY_CACHE = "strategies"
#: Storage settings the driver resolved the store with, handed to the actors on every node (secrets
#: are not: nodes take credentials from their own environment or instance profile).
STORAGE_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
_PROJECTS: dict[str, Project] = {}


def _project(spec: str) -> Project:
    """The project of ``spec``, imported once per worker process."""
    if spec not in _PROJECTS:
        _PROJECTS[spec] = load_project(spec)
    return _PROJECTS[spec]


def input_column(connection: str) -> str:
    """The dataset column holding one connection's padded inputs."""
    return f"input:{connection}"


# ------------------------------------------------------------------------------------ stage 1: load
def load_items(batch: dict[str, np.ndarray], project_spec: str, pad: int, threads: int = LOAD_THREADS
               ) -> dict[str, np.ndarray]:
    """Load every sample of each item (``threads`` at a time), padded to ``pad`` samples so every row
    has one tensor shape; failures are kept per sample id with their reason."""
    project = _project(project_spec)
    out: dict[str, list] = {key: [] for key in ("kind", "run", "slice", "shard", "population", "covered", "loaded",
                                                "failed", "gt")}
    inputs: dict[str, list] = {name: [] for name in project.connections}
    for kind, run, slice_, shard, population, ids in zip(batch["kind"], batch["run"], batch["slice"], batch["shard"],
                                                         batch["population"], batch["ids"]):
        ids = json.loads(ids)
        tensors, loaded, failed = load_available(project, str(slice_), ids, threads=threads)
        gts = np.zeros(pad, dtype=np.int64)
        gts[: len(loaded)] = [project.ground_truth(str(slice_), sid) for sid in loaded]
        for name, connection in project.connections.items():
            padded = np.zeros((pad, *connection.shape), dtype=np.float32)
            if tensors is not None:
                padded[: len(loaded)] = tensors[name].numpy()
            inputs[name].append(padded)
        for key, value in (("kind", kind), ("run", run), ("slice", slice_), ("shard", shard),
                           ("population", bool(population) or kind == SAMPLES), ("covered", json.dumps(ids)),
                           ("loaded", json.dumps(loaded)),
                           ("failed", json.dumps(failed)), ("gt", gts)):
            out[key].append(value)
    columns = {key: np.asarray(values) if key != "gt" else np.stack(values) for key, values in out.items()}
    columns.update({input_column(name): np.stack(arrays) for name, arrays in inputs.items()})
    return columns


# ------------------------------------------------------------------------------------ stage 2: explain
class ExplainShards:
    """Ray Data callable class: builds each run's engine once per actor, explains the items it is
    streamed (loading them itself when ``load_pad`` is given), commits "maps" shards to the store
    itself and returns summary rows. A sample that fails (loader error, wrong shape, not finite, an
    engine error) fails alone.

    Up to :data:`CALLS_PER_ACTOR` calls run at once, but only one uses the engine at a time: each
    engine batch's rows are laid out on a rows thread while the engine explains the next batch, and a
    shard is committed (heatmap object last) while the next shard computes. A call returns its summary
    only after its shard is committed, so a retried call rewrites the same key."""

    def __init__(self, project_spec: str, out: str, job: str, use_gpu: bool, batch_size: int,
                 threads: int | None = None, faithfulness: bool = False, storage_env: dict | None = None,
                 load_pad: int | None = None) -> None:
        os.environ.update(storage_env or {})
        if threads:
            torch.set_num_threads(threads)
        self.project_spec = project_spec
        self.project = _project(project_spec)
        #: items arrive unloaded (CPU jobs) and this actor loads them, padded to ``load_pad`` samples
        self.load_pad = load_pad
        self.location = store.open_location(out)
        self.job = job
        self.batch_size = batch_size
        self.faithfulness = faithfulness
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.engines: dict[str, CamEngine] = {}
        self._engine_lock = threading.Lock()
        self._rows = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camscope-rows")
        self._frozen = False

    def engine(self, run: str) -> CamEngine:
        """The run's CamEngine, built on first use (model moved to this actor's device)."""
        if run not in self.engines:
            # the gradient-strategy probe's choice is kept on the node: the other actors and later jobs skip it
            self.engines[run] = CamEngine(self.project.model(run).to(self.device),
                                          strategy_cache=cache_dir() / STRATEGY_CACHE)
        return self.engines[run]

    @contextlib.contextmanager
    def _engine(self) -> Iterator[list[float]]:
        """Hold the engine (one call computes at a time); yields ``[seconds waited for it]``."""
        started = time.perf_counter()
        with self._engine_lock:
            yield [time.perf_counter() - started]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.load_pad is not None:
            batch = load_items(batch, self.project_spec, self.load_pad)
        rows = []
        for i in range(len(batch["kind"])):
            item = {key: batch[key][i] for key in batch}
            started = time.perf_counter()
            row = self.maps(item) if str(item["kind"]) == MAPS else self.samples(item)
            busy = time.perf_counter() - started - row.pop("waited")
            row.update(kind=str(item["kind"]), run=str(item["run"]), slice=str(item["slice"]),
                       shard=str(item["shard"]), population=bool(item["population"]), seconds=busy)
            rows.append(row)
        return {key: np.asarray([row[key] for row in rows], dtype=object if key == "rows" else None)
                for key in rows[0]}

    def _inputs(self, item: dict, count: int) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.ascontiguousarray(item[input_column(name)][:count]))
                for name in self.project.connections}

    def maps(self, item: dict) -> dict[str, Any]:
        """Explain one shard in engine batches and commit it (heatmap object last)."""
        run, slice_, loaded = str(item["run"]), str(item["slice"]), json.loads(item["loaded"])
        failed = json.loads(item["failed"])
        inputs = self._inputs(item, len(loaded))
        with self._engine() as waited:
            futures = list(self._explained(run, slice_, loaded, inputs, failed))
        pieces, population, scores = [], [], []
        for ids, future in futures:
            try:
                heatmaps, samples, score = future.result()
            except Exception as error:  # noqa: BLE001 - laying out a batch's rows failed: its samples, by id
                failed.update({sid: failure_reason(error) for sid in ids})
                continue
            pieces.append(heatmaps)
            population.append(samples)
            if self.faithfulness:
                scores.append(score)
        heatmaps = pa.concat_tables(pieces) if pieces else store.HEATMAP_SCHEMA.empty_table()
        faithfulness = None
        if self.faithfulness:
            faithfulness = pa.concat_tables(scores) if scores else store.FAITHFULNESS_SCHEMA.empty_table()
        store.write_shard(self.location, run, slice_, str(item["shard"]), heatmaps, json.loads(item["covered"]),
                          failed, faithfulness, job=self.job)
        explained = len(loaded) - len(set(failed) & set(loaded))
        rows = b""
        if item["population"]:  # only a slice that needs a samples table sends its rows to the driver
            rows = _ipc(pa.concat_tables(population) if population else store.SAMPLE_SCHEMA.empty_table())
        return {"samples": explained, "maps": heatmaps.num_rows, "failed": json.dumps(failed),
                "layers": self._layers(run), "rows": rows, "waited": waited[0]}

    def samples(self, item: dict) -> dict[str, Any]:
        """Population rows of one chunk of the slice (returned, not written: the driver adds projections)."""
        run, slice_, loaded = str(item["run"]), str(item["slice"]), json.loads(item["loaded"])
        failed = json.loads(item["failed"])
        inputs = self._inputs(item, len(loaded))
        gts = item["gt"][: len(loaded)].tolist()
        with self._engine() as waited:
            table = self._population(run, slice_, loaded, inputs, gts, failed)
        return {"samples": table.num_rows, "maps": 0, "failed": json.dumps(failed), "layers": self._layers(run),
                "rows": _ipc(table), "waited": waited[0]}

    def _population(self, run: str, slice_: str, loaded: list[str], inputs: dict[str, torch.Tensor],
                    gts: list[int], failed: dict[str, str]) -> pa.Table:
        """The population rows of ``loaded`` (failures added to ``failed``)."""
        pieces, step = [], POPULATION_BATCHES * self.batch_size  # one label, one algorithm: far lighter
        for start in range(0, len(loaded), step):
            chunk = slice(start, start + step)
            ids = loaded[chunk]
            try:
                part = {name: tensor[chunk].to(self.device) for name, tensor in inputs.items()}
                pieces.append(population_rows(self.engine(run), part, run, slice_, ids, gts[chunk]))
            except Exception:  # noqa: BLE001 - retried one by one so that only the bad sample fails
                for one, gt in zip(range(start, start + len(ids)), gts[chunk]):
                    try:
                        part = {name: tensor[one : one + 1].to(self.device) for name, tensor in inputs.items()}
                        pieces.append(population_rows(self.engine(run), part, run, slice_, [loaded[one]], [gt]))
                    except Exception as error:  # noqa: BLE001 - reported by id
                        failed[loaded[one]] = failure_reason(error)
        return pa.concat_tables(pieces) if pieces else store.SAMPLE_SCHEMA.empty_table()

    def _explained(self, run: str, slice_: str, loaded: list[str], inputs: dict[str, torch.Tensor],
                   failed: dict[str, str]) -> Iterator[tuple[list[str], Future]]:
        """Explain a shard's samples in engine batches: ``(ids, future of (heatmaps, samples, scores))``
        per batch that explained; what failed goes into ``failed``."""
        for start in range(0, len(loaded), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            part = {name: tensor[chunk] for name, tensor in inputs.items()}
            for ids, tables, reason in self._isolated(run, slice_, loaded[chunk], part):
                if reason is not None:
                    failed.update({sid: reason for sid in ids})
                else:
                    yield ids, tables

    def _isolated(self, run: str, slice_: str, ids: list[str], inputs: dict[str, torch.Tensor]):
        """Yield ``(ids, future of (heatmaps, samples, scores), None)`` for what explains and
        ``(ids, None, reason)`` for what fails; a failing batch is retried sample by sample so a bad
        one fails alone."""
        try:
            yield ids, self._explain(run, slice_, ids, inputs), None
            return
        except Exception as error:  # noqa: BLE001 - isolated below
            if len(ids) == 1:
                yield ids, None, failure_reason(error)
                return
        for b, sid in enumerate(ids):
            one = {name: tensor[b : b + 1] for name, tensor in inputs.items()}
            yield from self._isolated(run, slice_, [sid], one)

    def _explain(self, run: str, slice_: str, ids: list[str], inputs: dict[str, torch.Tensor]) -> Future:
        """Explain one engine batch; its rows are laid out on the rows thread (overlapping the next
        batch) unless faithfulness scores need them now."""
        engine = self.engine(run)
        on_device = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        batch = explain_batch(self.project, run, slice_, ids, engine=engine, inputs=on_device)
        if not self._frozen:
            # what exists now (modules, the model, what the first explain imported) lives as long as the
            # actor: the cyclic GC stops walking it on every full collection (GC time 0.22 to 0.04 s
            # per 150 collections in an actor of the 5,000-sample demo job)
            gc.freeze()
            self._frozen = True
        if not self.faithfulness:
            return self._rows.submit(lambda: (*batch_rows(batch), None))
        heatmaps, samples = batch_rows(batch)
        done: Future = Future()
        done.set_result((heatmaps, samples, faithfulness_rows(engine.model, on_device, heatmaps, samples)))
        return done

    def _layers(self, run: str) -> str:
        engine = self.engines.get(run)
        if engine is None or engine._layers is None:  # layers are known once the engine has explained something
            return "[]"
        return json.dumps([{"name": i.name, "depth": i.depth, "shape": list(i.shape)} for i in engine.layers])


def _ipc(table: pa.Table) -> bytes:
    """``table`` as Arrow IPC stream bytes (population rows travel back to the driver this way)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------------ the dataset
def pool_size(workers: int | None, gpus_per_worker: float, items: int) -> int:
    """Actors in the pool: ``workers``, or by default one per GPU share the cluster holds (with
    ``gpus_per_worker``), else one per CPU core up to :data:`MAX_DEFAULT_CPU_ACTORS` (past that, the
    actors get more torch threads each); never more than there are work items."""
    if workers is None:
        resources = ray.cluster_resources()
        if gpus_per_worker > 0:
            workers = int(resources.get("GPU", 0) / gpus_per_worker)
        else:
            workers = min(int(resources.get("CPU", 1)), MAX_DEFAULT_CPU_ACTORS)
    return max(1, min(workers, items))


def loaders(workers: int) -> int:
    """Loading tasks in flight for ``workers`` actors."""
    return -(-workers // ACTORS_PER_LOADER)


def cpus_per_worker(gpus_per_worker: float, workers: int) -> tuple[float, int]:
    """``(CPUs reserved per actor, torch threads per actor)``. CPU actors (which load their own items)
    share the cluster's cores, each within one node; GPU actors need one core each and leave the
    node's others to their loading tasks. An actor's torch threads leave one of its cores to its
    rows thread (quantizing, Parquet encoding, commits)."""
    if gpus_per_worker > 0:
        return 1, 1
    largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    share = min(largest_node, ray.available_resources().get("CPU", 1) / workers)
    return math.floor(share * 100) / 100, max(1, int(share) - 1)  # rounded down: all of them fit


def run_pipeline(project_spec: str, out: str, job: str, items: Sequence[dict], pad: int, workers: int,
                 gpus_per_worker: float, batch_size: int, faithfulness: bool = False) -> list[dict]:
    """Stream ``items`` into ``workers`` explanation actors (see :func:`pool_size`), through loading
    tasks for GPU actors; one summary dict per item."""
    reserved, threads = cpus_per_worker(gpus_per_worker, workers)
    on_gpu = gpus_per_worker > 0
    dataset = ray.data.from_items(list(items), override_num_blocks=len(items))
    if on_gpu:
        dataset = dataset.map_batches(
            load_items, fn_kwargs={"project_spec": project_spec, "pad": pad}, batch_size=1, batch_format="numpy",
            num_cpus=LOAD_CPUS, compute=ray.data.TaskPoolStrategy(size=loaders(workers)),
        )
    explained = dataset.map_batches(
        ExplainShards,
        fn_constructor_kwargs={"project_spec": project_spec, "out": out, "job": job, "use_gpu": on_gpu,
                               "batch_size": batch_size, "threads": None if on_gpu else threads,
                               "faithfulness": faithfulness,
                               "storage_env": {k: os.environ[k] for k in STORAGE_VARIABLES if os.environ.get(k)},
                               "load_pad": None if on_gpu else pad},
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(items)), enable_true_multi_threading=True,
                                           max_concurrent_calls_per_actor=CALLS_PER_ACTOR),
        batch_size=1,  # one item per call: a shard is the unit of commit and resume
        batch_format="numpy",
        num_cpus=reserved,
        num_gpus=gpus_per_worker or None,
        # Ray Data's actor pool restarts a dead actor and retries its item (max_restarts=-1,
        # max_task_retries=-1 are its defaults); a retried shard is rewritten under the same key.
    )
    return [dict(row) for row in explained.iter_rows()]
