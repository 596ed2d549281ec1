"""``camscope run``: explain every sample of a project's slices with Ray Data into the Parquet store,
on a local directory or object storage (``--out s3://bucket/prefix``).

The driver takes the store's lock (one writing job per store, :mod:`camscope.joblock`), cuts each
(run, slice) into the store's fixed shard grid, and queues every shard the store lacks (or holds only
partly: a later, larger ``--limit`` rewrites it under the same key) plus, when the slice has no
samples table yet, the whole slice for the population table. :mod:`workflows.pipeline` streams the
queue to the explanation actors (through loading tasks when they hold GPUs; CPU actors load their own
items), which commit the shards themselves. The
driver then adds the 2-D projections (PCA, UMAP, t-SNE) to each new samples table and merges the
store metadata.

Examples:
    >>> summary = run_job("camscope.demo:project", "s3://bucket/store", limit=32)
    >>> summary["maps"], summary["failed"]
    (51840, {})
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from camscope import store
from camscope.joblock import JobLock
from camscope.project import Project, ProjectError, load_project
from camscope.projections import chosen_methods, project_all
from camscope.rows import FAITHFULNESS_METRIC, labels_policy
from camscope.storage import Location, StorageError
from workflows.pipeline import MAPS, SAMPLES, pool_size, run_pipeline


class JobError(ValueError):
    """Bad arguments or an unusable environment, found before any work starts (one-line message)."""


@dataclass
class Plan:
    """What a job does: the work items, and what earlier jobs already completed."""

    items: list[dict] = field(default_factory=list)
    shards: int = 0
    skipped: int = 0
    earlier_failures: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ validating
def _chosen(kind: str, requested: Sequence[str] | None, known: dict) -> list[str]:
    if not requested:
        return list(known)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise JobError(f"unknown {kind} {unknown[0]!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(requested))


def validate(project_spec: str, out: str, runs: Sequence[str] | None, slices: Sequence[str] | None,
             workers: int | None, gpus_per_worker: float, batch_size: int, limit: int | None,
             shard_size: int | None = None) -> tuple[Project, list[str], list[str], Location, dict]:
    """Check every argument (JobError / ProjectError / StoreError on the first bad one); no Ray, no
    model built. Returns the project, runs, slices, the store location and the store metadata so far."""
    optional = {"workers": workers, "limit": limit, "shard size": shard_size}  # None: the default
    for name, value in (("batch size", batch_size), *((k, v) for k, v in optional.items() if v is not None)):
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
    location = store.open_location(out)
    existing = store.read_meta(location) or {}
    meta = store.merge_meta(existing or None, {"label_names": project.label_names, "shard_size": shard_size})
    if shard_size is not None and existing and meta["shard_size"] != shard_size:
        raise JobError(f"the store's shard grid is {meta['shard_size']} samples per shard; "
                       f"--shard-size {shard_size} applies to a new store only")
    return project, chosen_runs, chosen_slices, location, meta


# ------------------------------------------------------------------------------------ planning
def plan(project: Project, location: Location, runs: Sequence[str], slices: Sequence[str], shard_size: int,
         limit: int | None, faithfulness: bool = False) -> Plan:
    """Every shard the store lacks for the first ``limit`` samples of each slice, and every slice
    without a samples table; failures recorded by earlier jobs are collected for the report.

    A slice without a samples table takes its population rows from the shards explained now (their
    explanation already holds them) and from "samples" items for the rest of the slice."""
    result = Plan()
    for run in runs:
        for name in slices:
            ids = project.slice(name).sample_ids
            states = store.shard_states(location, run, name)
            population = _needs_population(location, run, name, ids, result)
            first = len(result.items)
            end = len(ids) if limit is None else min(limit, len(ids))
            for k, (shard, grid_ids) in enumerate(store.shard_grid(ids, shard_size)):
                wanted = grid_ids[: max(0, end - k * shard_size)]
                if not wanted:
                    continue
                result.shards += 1
                covered, failed, scored = states.get(shard, ([], {}, False))
                if set(wanted) <= set(covered) and (scored or not faithfulness):
                    result.skipped += 1
                    result.earlier_failures.update({f"{run}/{name}/{sid}": reason for sid, reason in failed.items()})
                    continue
                keep = grid_ids[: max(len(wanted), len(covered))]  # never shrink what a shard covers
                result.items.append(_item(MAPS, run, name, shard, keep, population))
            if population:
                explained = {sid for item in result.items[first:] for sid in json.loads(item["ids"])}
                rest = [sid for sid in ids if sid not in explained]
                result.items.extend(_item(SAMPLES, run, name, f"samples-{k:06d}", chunk) for k, (_, chunk) in
                                    enumerate(store.shard_grid(rest, shard_size)))
    return result


def _needs_population(location: Location, run: str, name: str, ids: list[str], result: Plan) -> bool:
    """Whether the (run, slice) lacks a samples table covering ``ids`` (else its failures go to ``result``)."""
    path = store.samples_file(location, run, name)
    if location.fs.get_file_info(path).type.name == "File":
        covered, failed = store.footer(location, path)
        if set(ids) <= set(covered):
            result.earlier_failures.update({f"{run}/{name}/{sid}": reason for sid, reason in failed.items()})
            return False
    return True


def _item(kind: str, run: str, slice: str, shard: str, ids: Sequence[str], population: bool = False) -> dict:
    """A work item; ``population``: a "maps" item also returns its samples' population rows."""
    return {"kind": kind, "run": run, "slice": slice, "shard": shard, "ids": json.dumps(list(ids)),
            "population": population}


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


# ------------------------------------------------------------------------------------ finishing
def finish_samples(location: Location, run: str, slice: str, order: Sequence[str], summaries: Sequence[dict],
                   job: str, projections: Sequence[str] | None = None) -> int:
    """Join the population rows of one (run, slice) in the slice's ``order``, add the projections
    (``x, y`` = PCA) and commit the samples table; returns its row count."""
    tables, failed = [], {}
    for summary in summaries:
        failed.update(json.loads(summary["failed"]))
        if summary["rows"]:
            tables.append(pa.ipc.open_stream(pa.py_buffer(summary["rows"])).read_all())
    table = pa.concat_tables(tables) if tables else store.SAMPLE_SCHEMA.empty_table()
    position = {sid: i for i, sid in enumerate(order)}
    ids = table.column("sample_id").to_pylist()
    table = table.take(sorted(range(table.num_rows), key=lambda i: position.get(ids[i], -1)))
    if table.num_rows:
        embeddings = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        coords = project_all(embeddings, projections)
        coords["x"] = coords["pca"]
        for method, values in coords.items():
            for axis, column in zip(("x", "y"), values.T):
                name = axis if method == "x" else f"{method}_{axis}"
                table = table.set_column(table.schema.get_field_index(name), name, pa.array(column, pa.float32()))
    store.write_samples(location, run, slice, table, failed, job=job)
    return table.num_rows


def merged_meta(location: Location, project: Project, summaries: Sequence[dict], spec: str | None,
                shard_size: int, faithfulness: bool = False) -> dict:
    """This job's project (name and ``module:attr`` spec), labels policy, shard grid and per-run layers,
    merged into the store's metadata (plus ``"faithfulness"``: the stored metric, with scores)."""
    new: dict[str, Any] = {
        "schema_version": store.SCHEMA_VERSION,
        "project": project.name,
        "project_spec": spec,
        "label_names": project.label_names,
        "labels_policy": labels_policy(len(project.label_names)),
        "connections": {name: {"shape": list(c.shape)} for name, c in project.connections.items()},
        "shard_size": shard_size,
        "projections": {"x, y": "pca", "methods": list(store.PROJECTIONS), "seed": 0},
        "runs": {},
    }
    if faithfulness:
        new["faithfulness"] = dict(FAITHFULNESS_METRIC)
    for summary in summaries:
        layers = json.loads(summary["layers"])
        if layers:
            new["runs"][summary["run"]] = {"layers": layers}
    return store.merge_meta(store.read_meta(location), new)


# ------------------------------------------------------------------------------------ entry points
def run_job(project_spec: str, out: str, runs: Sequence[str] | None = None,
            slices: Sequence[str] | None = None, workers: int | None = None, gpus_per_worker: float = 0,
            batch_size: int = 16, limit: int | None = None, address: str | None = None,
            faithfulness: bool = False, shard_size: int | None = None,
            projections: Sequence[str] | None = None) -> dict:
    """Explain the chosen runs x slices into the store at ``out`` (a path or a URI); resumes what
    earlier jobs began and never stores a key twice.

    Args:
        workers: actors in the pool; ``None``: one per GPU share (with ``gpus_per_worker``), else one
            single-threaded actor per CPU core, up to 16 (on CPU, processes side by side beat threads in
            one process: the engine's per-layer Python and the row layout hold the GIL).
        batch_size: samples per engine call (does not change what is stored where).
        limit: maps for the first ``limit`` samples of each slice only; the samples table always
            covers the whole slice.
        shard_size: samples per shard of a new store (default 64); an existing store keeps its grid.
        projections: population projections to compute (default: ``$CAMSCOPE_PROJECTIONS`` or all).

    Returns:
        summary: ``samples`` and ``maps`` explained now, ``workers`` (actors used, 0 when nothing was
            left to do), ``population`` (rows of new samples tables),
        ``seconds``, ``maps_per_s``, ``actor_seconds`` (time the actors spent in shards), ``blocks``
        (shards in the job's range), ``skipped_blocks`` (already complete), ``failed``
        ({"run/slice/id": reason}, including failures recorded by earlier jobs).

    Raises:
        JobError / ProjectError / StoreError: bad arguments or storage, before any work starts.
    """
    started = time.perf_counter()
    project, runs, slices, location, meta = validate(project_spec, out, runs, slices, workers, gpus_per_worker,
                                                     batch_size, limit, shard_size)
    projections = chosen_methods(projections)
    if gpus_per_worker > 0 and not (address or os.environ.get("RAY_ADDRESS")):
        if not torch.cuda.is_available():
            raise JobError(f"--gpus-per-worker {gpus_per_worker} asked for GPUs but this machine has none")
    with JobLock(location) as lock:
        work = plan(project, location, runs, slices, meta["shard_size"], limit, faithfulness)
        summaries: list[dict] = []
        actors = 0
        if work.items:
            summaries, actors = _execute_on_ray(project_spec, location, lock.job, work.items, meta["shard_size"],
                                                workers, gpus_per_worker, batch_size, address, faithfulness)
        population = 0
        with_rows = [s for s in summaries if s["population"]]
        for (run, name) in dict.fromkeys((s["run"], s["slice"]) for s in with_rows):
            part = [s for s in with_rows if (s["run"], s["slice"]) == (run, name)]
            population += finish_samples(location, run, name, project.slice(name).sample_ids, part, lock.job,
                                         projections)
        if work.items or store.read_meta(location) is None:
            store.write_meta(location, merged_meta(location, project, summaries, project_spec, meta["shard_size"],
                                                   faithfulness), job=lock.job)
    seconds = time.perf_counter() - started
    maps_done = [s for s in summaries if s["kind"] == MAPS]
    maps = sum(int(s["maps"]) for s in maps_done)
    failed = dict(work.earlier_failures)
    for summary in summaries:
        for sid, reason in json.loads(summary["failed"]).items():
            failed[f"{summary['run']}/{summary['slice']}/{sid}"] = reason
    return {
        "samples": sum(int(s["samples"]) for s in maps_done),
        "maps": maps,
        "population": population,
        "seconds": seconds,
        "maps_per_s": maps / seconds if seconds > 0 else 0.0,
        "actor_seconds": sum(float(s["seconds"]) for s in maps_done),
        "blocks": work.shards,
        "skipped_blocks": work.skipped,
        "failed": failed,
        "workers": actors,
    }


def _execute_on_ray(project_spec: str, location: Location, job: str, items: Sequence[dict], pad: int,
                    workers: int | None, gpus_per_worker: float, batch_size: int, address: str | None,
                    faithfulness: bool) -> tuple[list[dict], int]:
    """``(summaries, actors used)``."""
    started_here = _start_ray(address)
    try:
        _check_gpus(gpus_per_worker)
        workers = pool_size(workers, gpus_per_worker, len(items))
        return run_pipeline(project_spec, location.uri, job, items, pad, workers, gpus_per_worker, batch_size,
                            faithfulness), workers
    finally:
        if started_here:
            ray.shutdown()


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
                          address=args.address, faithfulness=getattr(args, "faithfulness", False),
                          shard_size=getattr(args, "shard_size", None))
    except (JobError, ProjectError, StorageError) as error:
        print(f"camscope run: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if summary["failed"]:
        print(f"camscope run: {len(summary['failed'])} sample(s) failed", file=sys.stderr)
        return 1
    return 0
