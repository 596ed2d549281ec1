"""``camscope run``: explain every sample of a project's slices with Ray Data into the Parquet store.

The driver splits each (run, slice) into blocks of ``batch_size`` samples with deterministic ids,
skips blocks already in the store (resume), and hands the rest to a Ray Data ``map_batches`` over a
pool of :class:`ExplainBlocks` actors (model built once per actor, ``num_gpus`` per actor when
asked). Each actor commits its blocks itself; the driver then joins each (run, slice)'s sample
rows, adds the 2-D projection and writes the samples table and the store metadata.

Examples:
    >>> summary = run_job("camscope.demo:project", "store", limit=32)
    >>> summary["maps"], round(summary["maps_per_s"])
    (96768, 2100)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from camscope import store
from camscope.analysis import project_2d
from camscope.engine import CamEngine
from camscope.project import Project, ProjectError, load_project
from camscope.rows import FAITHFULNESS_METRIC, explain_samples, faithfulness_rows, labels_policy, load_available


class JobError(ValueError):
    """Bad arguments or an unusable environment, found before any work starts (one-line message)."""


@dataclass(frozen=True)
class Block:
    """A unit of work and of commit: some samples of one (run, slice)."""

    run: str
    slice: str
    block: str
    ids: tuple[str, ...]


# ------------------------------------------------------------------------------------ planning
def plan_blocks(project: Project, runs: Sequence[str], slices: Sequence[str], batch_size: int,
                limit: int | None) -> list[Block]:
    """Every block of the job: the first ``limit`` samples of each slice, ``batch_size`` per block."""
    blocks = []
    for run in runs:
        for name in slices:
            ids = project.slice(name).sample_ids[:limit]
            for start in range(0, len(ids), batch_size):
                chunk = tuple(ids[start : start + batch_size])
                blocks.append(Block(run, name, store.block_id(run, name, chunk), chunk))
    return blocks


def is_complete(out: Path, block: Block, faithfulness: bool = False) -> bool:
    """A block is complete once its heatmap file has been renamed into place (it is committed last);
    with ``faithfulness``, a block written without scores is not complete (it is redone)."""
    if not store.heatmap_block_path(out, block.run, block.slice, block.block).is_file():
        return False
    return not faithfulness or store.faithfulness_block_path(out, block.run, block.slice, block.block).is_file()


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as error:
        raise JobError(f"output directory {str(out)!r} is not writable: {error.strerror or error}") from error


def _chosen(kind: str, requested: Sequence[str] | None, known: dict) -> list[str]:
    if not requested:
        return list(known)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise JobError(f"unknown {kind} {unknown[0]!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(requested))


def validate(project_spec: str, out: str | Path, runs: Sequence[str] | None, slices: Sequence[str] | None,
             workers: int, gpus_per_worker: float, batch_size: int, limit: int | None
             ) -> tuple[Project, list[str], list[str], Path]:
    """Check every argument (JobError / ProjectError on the first bad one); no Ray, no model built."""
    for name, value in (("workers", workers), ("batch size", batch_size), ("limit", 1 if limit is None else limit)):
        if not isinstance(value, int) or value < 1:
            raise JobError(f"{name} must be an integer >= 1, got {value!r}")
    if gpus_per_worker < 0:
        raise JobError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    project = load_project(project_spec)
    chosen_runs = _chosen("run", runs, project.runs)
    chosen_slices = _chosen("slice", slices, project.slices)
    for kind, names in (("run", chosen_runs), ("slice", chosen_slices)):
        for name in names:
            store.check_name(kind, name)
    out = Path(out).expanduser().resolve()
    _check_out(out)
    existing = store.read_meta(out)
    if existing is not None:
        store.merge_meta(existing, {"label_names": project.label_names})
    return project, chosen_runs, chosen_slices, out


# ------------------------------------------------------------------------------------ the actor
class ExplainBlocks:
    """Ray Data callable class: builds the project's models once per actor and commits blocks.

    ``__call__`` takes a batch of block descriptions (run, slice, block, ids as JSON) and returns
    one summary row per block; the heatmaps themselves go straight to the store, never through
    Ray's object store.
    """

    def __init__(self, project_spec: str, out: str, use_gpu: bool, threads: int | None = None,
                 faithfulness: bool = False) -> None:
        self.faithfulness = faithfulness
        if threads:
            torch.set_num_threads(threads)
        self.project = load_project(project_spec)
        self.out = out
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.engines: dict[str, CamEngine] = {}

    def engine(self, run: str) -> CamEngine:
        """The run's CamEngine, built on first use (model moved to this actor's device)."""
        if run not in self.engines:
            self.engines[run] = CamEngine(self.project.model(run).to(self.device))
        return self.engines[run]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.explain_block(Block(str(run), str(slice_), str(block), tuple(json.loads(ids))))
                for run, slice_, block, ids in zip(batch["run"], batch["slice"], batch["block"], batch["ids"])]
        return {key: np.asarray([row[key] for row in rows]) for key in rows[0]} if rows else {}

    def explain_block(self, block: Block) -> dict[str, Any]:
        """Explain and commit one block; failures are reported per sample id, never raised."""
        started = time.perf_counter()
        summary = {"run": block.run, "slice": block.slice, "block": block.block, "samples": 0, "maps": 0,
                   "failed": "{}", "layers": "[]", "seconds": 0.0}
        inputs, loaded, failed = load_available(self.project, block.slice, block.ids)
        try:
            engine = self.engine(block.run)
            if inputs is not None:
                heatmaps, samples = explain_samples(self.project, block.run, block.slice, loaded, engine=engine,
                                                    inputs=inputs)
            else:
                heatmaps, samples = store.HEATMAP_SCHEMA.empty_table(), store.SAMPLE_SCHEMA.empty_table()
            scores = None
            if self.faithfulness:
                scores = (faithfulness_rows(engine.model, inputs, heatmaps, samples) if inputs is not None
                          else store.FAITHFULNESS_SCHEMA.empty_table())
        except Exception as error:  # noqa: BLE001 - reported per sample; the block stays undone for a re-run
            reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
            summary["failed"] = json.dumps({**failed, **{sid: reason for sid in loaded}})
            return summary
        store.write_block(self.out, block.run, block.slice, block.block, heatmaps, samples, failed=list(failed),
                          faithfulness=scores)
        if inputs is not None:  # layers are known once the engine has explained something
            summary["layers"] = json.dumps([{"name": i.name, "depth": i.depth, "shape": list(i.shape)}
                                            for i in engine.layers])
        summary.update(samples=samples.num_rows, maps=heatmaps.num_rows, failed=json.dumps(failed),
                       seconds=time.perf_counter() - started)
        return summary


# ------------------------------------------------------------------------------------ Ray
def _start_ray(address: str | None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local instance; True if we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    except Exception as error:  # noqa: BLE001 - Ray raises several types for an unreachable cluster
        raise JobError(f"cannot start or reach Ray at {address or 'a local instance'}: "
                       f"{' '.join(str(error).split())[:300]}") from error
    return True


def _check_gpus(gpus_per_worker: float) -> None:
    if gpus_per_worker <= 0:
        return
    available = ray.cluster_resources().get("GPU", 0)
    if available <= 0:
        raise JobError(f"--gpus-per-worker {gpus_per_worker} asked for GPUs but the Ray cluster has none")
    if gpus_per_worker > available:
        raise JobError(f"--gpus-per-worker {gpus_per_worker} exceeds the cluster's {available:g} GPUs")


def _cpus_per_worker(gpus_per_worker: float, workers: int) -> int:
    """CPU actors share the cluster's cores (torch threads follow) but each must fit on one node;
    GPU actors need one core each."""
    if gpus_per_worker > 0:
        return 1
    largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    return max(1, min(int(largest_node), int(ray.available_resources().get("CPU", 1)) // workers))


def execute(project_spec: str, out: Path, blocks: Sequence[Block], workers: int, gpus_per_worker: float,
            faithfulness: bool = False) -> list[dict]:
    """Run the blocks on a Ray Data actor pool; one summary dict per block."""
    cpus = _cpus_per_worker(gpus_per_worker, workers)
    items = [{"run": b.run, "slice": b.slice, "block": b.block, "ids": json.dumps(list(b.ids))} for b in blocks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    explained = dataset.map_batches(
        ExplainBlocks,
        fn_constructor_kwargs={"project_spec": project_spec, "out": str(out), "use_gpu": gpus_per_worker > 0,
                               "threads": None if gpus_per_worker > 0 else cpus, "faithfulness": faithfulness},
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))),
        batch_size=1,  # one block per call: a block is the unit of commit and resume
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=gpus_per_worker or None,
        # Ray Data's actor pool already sets max_restarts=-1 and max_task_retries=-1: a dead actor is
        # replaced and its block retried (passing them here is deprecated since Ray 2.60).
    )
    return [dict(row) for row in explained.iter_rows()]


# ------------------------------------------------------------------------------------ finishing
def finish_samples(out: Path, run: str, slice: str, order: Sequence[str]) -> int:
    """Join the staged sample rows of one (run, slice) in the slice's ``order``, project them to 2-D and
    write the samples table."""
    table = store.staged_samples(out, run, slice)
    position = {sid: i for i, sid in enumerate(order)}
    ids = table.column("sample_id").to_pylist()
    table = table.take(sorted(range(table.num_rows), key=lambda i: position.get(ids[i], -1)))
    if table.num_rows:
        embeddings = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        coords = project_2d(embeddings)  # PCA: deterministic, so a re-run writes the same table
        table = table.set_column(table.schema.get_field_index("x"), "x", pa.array(coords[:, 0], pa.float32()))
        table = table.set_column(table.schema.get_field_index("y"), "y", pa.array(coords[:, 1], pa.float32()))
    store.write_table_atomic(table, store.samples_path(out, run, slice))
    return table.num_rows


def write_meta(out: Path, project: Project, summaries: Sequence[dict], spec: str | None = None,
               faithfulness: bool = False) -> dict:
    """Merge this job's project (name and ``module:attr`` spec), labels policy and per-run layers into
    ``_camscope.json`` (plus ``"faithfulness"``: the stored metric, when this job computed scores)."""
    new: dict[str, Any] = {
        "schema_version": store.SCHEMA_VERSION,
        "project": project.name,
        "project_spec": spec,
        "label_names": project.label_names,
        "labels_policy": labels_policy(len(project.label_names)),
        "connections": {name: {"shape": list(c.shape)} for name, c in project.connections.items()},
        "runs": {},
    }
    if faithfulness:
        new["faithfulness"] = dict(FAITHFULNESS_METRIC)
    for summary in summaries:
        layers = json.loads(summary["layers"])
        if layers:
            new["runs"][summary["run"]] = {"layers": layers}
    merged = store.merge_meta(store.read_meta(out), new)
    store.write_json_atomic(merged, out / store.META_FILE)
    return merged


# ------------------------------------------------------------------------------------ entry points
def run_job(project_spec: str, out: str | Path, runs: Sequence[str] | None = None,
            slices: Sequence[str] | None = None, workers: int = 1, gpus_per_worker: float = 0,
            batch_size: int = 16, limit: int | None = None, address: str | None = None,
            faithfulness: bool = False) -> dict:
    """Explain the chosen runs x slices into the store at ``out``; resumes what a previous job began.

    Returns:
        summary: ``samples`` and ``maps`` computed now, ``seconds``, ``maps_per_s``, ``actor_seconds``
        (time the actors spent in blocks, all actors together), ``blocks``,
        ``skipped_blocks`` (already complete), ``failed`` ({"run/slice/id": reason}). With
        ``faithfulness``, every block also stores one ``top_fraction_drop`` score per map of the
        predicted label in ``DIR/faithfulness/`` (blocks committed without scores are redone).

    Raises:
        JobError / ProjectError: bad arguments, before any work starts.
    """
    started = time.perf_counter()
    project, runs, slices, out = validate(project_spec, out, runs, slices, workers, gpus_per_worker,
                                          batch_size, limit)
    blocks = plan_blocks(project, runs, slices, batch_size, limit)
    todo = [block for block in blocks if not is_complete(out, block, faithfulness)]
    if gpus_per_worker > 0 and not (address or os.environ.get("RAY_ADDRESS")):
        if not torch.cuda.is_available():
            raise JobError(f"--gpus-per-worker {gpus_per_worker} asked for GPUs but this machine has none")
    summaries: list[dict] = []
    for run, name in {(block.run, block.slice) for block in todo}:
        store.remove_temporaries(out, run, name)  # left by a killed job; this job owns the partition now
    if todo:
        summaries = _execute_on_ray(project_spec, out, todo, workers, gpus_per_worker, address, faithfulness)
    done = {(s["run"], s["slice"]) for s in summaries if s["samples"] or s["maps"]}
    for run in runs:
        for name in slices:
            if (run, name) in done or not store.samples_path(out, run, name).is_file():
                finish_samples(out, run, name, project.slice(name).sample_ids)
    if todo or store.read_meta(out) is None:
        write_meta(out, project, summaries, project_spec, faithfulness)
    seconds = time.perf_counter() - started
    maps = sum(int(s["maps"]) for s in summaries)
    return {
        "samples": sum(int(s["samples"]) for s in summaries),
        "maps": maps,
        "seconds": seconds,
        "maps_per_s": maps / seconds if seconds > 0 else 0.0,
        "actor_seconds": sum(float(s["seconds"]) for s in summaries),
        "blocks": len(blocks),
        "skipped_blocks": len(blocks) - len(todo),
        "failed": _failures(out, blocks, todo, summaries),
    }


def _execute_on_ray(project_spec: str, out: Path, todo: Sequence[Block], workers: int, gpus_per_worker: float,
                    address: str | None, faithfulness: bool = False) -> list[dict]:
    started_here = _start_ray(address)
    try:
        _check_gpus(gpus_per_worker)
        return execute(project_spec, out, todo, workers, gpus_per_worker, faithfulness)
    finally:
        if started_here:
            ray.shutdown()


def _failures(out: Path, blocks: Sequence[Block], todo: Sequence[Block], summaries: Sequence[dict]) -> dict:
    """Failed sample ids of this job and of the complete blocks it skipped, as {"run/slice/id": reason}."""
    failed: dict[str, str] = {}
    pending = {block.block for block in todo}
    for block in blocks:
        if block.block not in pending and is_complete(out, block):
            path = store.heatmap_block_path(out, block.run, block.slice, block.block)
            for sid in store.block_failures(path):
                failed[f"{block.run}/{block.slice}/{sid}"] = "failed to load (earlier job)"
    for summary in summaries:
        for sid, reason in json.loads(summary["failed"]).items():
            failed[f"{summary['run']}/{summary['slice']}/{sid}"] = reason
    return failed


def format_summary(summary: dict) -> str:
    """The final line(s) printed by ``camscope run``."""
    line = (f"camscope run: {summary['samples']} samples, {summary['maps']} maps in {summary['seconds']:.1f} s "
            f"({summary['maps_per_s']:.0f} maps/s); {summary['blocks']} blocks, "
            f"{summary['skipped_blocks']} already complete")
    failures = [f"  failed {key}: {reason}" for key, reason in sorted(summary["failed"].items())]
    return "\n".join([line, *failures])


def run_cli(args: argparse.Namespace) -> int:
    """``camscope run``: 0 on success, 1 if some samples failed, 2 on bad arguments."""
    try:
        summary = run_job(args.project, args.out, runs=args.run, slices=args.slice, workers=args.workers,
                          gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size, limit=args.limit,
                          address=args.address, faithfulness=getattr(args, "faithfulness", False))
    except (JobError, ProjectError, store.StoreError) as error:
        print(f"camscope run: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if summary["failed"]:
        print(f"camscope run: {len(summary['failed'])} sample(s) failed", file=sys.stderr)
        return 1
    return 0
