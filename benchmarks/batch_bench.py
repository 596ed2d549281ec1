"""Batch-job throughput vs the in-process engine, on the same samples, in one run.

Both sides load the same samples and produce the same maps (every algorithm, layer, connection and
label); "maps" counts store rows, i.e. samples x labels x algorithms x (connection, layer) pairs.

    engine  : CamEngine.explain over batches in this process (model built and warmed up first)
    job     : workflows.batch_job.run_job on a local one-node Ray that is already up (actor start,
              model load, quantization and Parquet writes included)
    job+ray : the same job's time plus starting Ray itself
    blocks  : the job's time inside its actor's blocks (load, explain, quantize, write), i.e. the
              steady state once the actor is up

Usage:
    python benchmarks/batch_bench.py [--samples 128] [--batch-size 16] [--run cnn] [--gpu]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from camscope import CamEngine
from camscope.demo import project
from camscope.rows import sample_labels

SLICE = "validation"


def engine_throughput(run: str, ids: list[str], batch_size: int, device: str) -> tuple[int, float]:
    """(maps, seconds) of the in-process engine over ``ids``, loading included, warm-up excluded."""
    engine = CamEngine(project.model(run).to(device))
    engine.explain(project.load_batch(SLICE, ids[:batch_size]))  # warm-up: discovery, allocator
    pairs = sum(len(info.depth) for info in engine.layers)
    maps = 0
    started = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        explanation = engine.explain(project.load_batch(SLICE, chunk))
        if device == "cuda":
            torch.cuda.synchronize()
        labels = sample_labels(explanation.probabilities, [0] * len(chunk))
        maps += sum(len(chosen) for chosen in labels) * len(explanation.maps) * pairs
    return maps, time.perf_counter() - started


def job_throughput(run: str, samples: int, batch_size: int, gpus: float) -> tuple[dict, float]:
    """(job summary, seconds to start Ray) for the batch job on a fresh store."""
    import ray

    from workflows.batch_job import run_job

    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_seconds = time.perf_counter() - started
    try:
        with tempfile.TemporaryDirectory(prefix="camscope-bench-") as out:
            summary = run_job("camscope.demo:project", out, runs=[run], slices=[SLICE], workers=1,
                              gpus_per_worker=gpus, batch_size=batch_size, limit=samples,
                              projections=["pca"])  # the population table's UMAP/t-SNE are not maps
    finally:
        ray.shutdown()
    return summary, ray_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--run", default="cnn")
    parser.add_argument("--gpu", action="store_true", help="engine on cuda, job with one GPU per worker")
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    ids = project.slice(SLICE).sample_ids[: args.samples]
    engine_maps, engine_seconds = engine_throughput(args.run, ids, args.batch_size, device)
    project.model(args.run).to("cpu")
    summary, ray_seconds = job_throughput(args.run, args.samples, args.batch_size, 1.0 if args.gpu else 0.0)
    assert summary["maps"] == engine_maps, (summary["maps"], engine_maps)
    engine_rate = engine_maps / engine_seconds
    job_rate = summary["maps"] / summary["seconds"]
    with_ray = summary["maps"] / (summary["seconds"] + ray_seconds)
    in_blocks = summary["maps"] / summary["actor_seconds"]
    hardware = torch.cuda.get_device_name() if args.gpu else f"{platform.processor() or platform.machine()}, " \
                                                               f"{torch.get_num_threads()} threads"
    print(f"\n{args.samples} samples of demo run {args.run!r}, batch {args.batch_size}, {device} ({hardware}); "
          f"{engine_maps} maps\n")
    print("| path | seconds | maps/s | vs engine |")
    print("|---|---:|---:|---:|")
    print(f"| in-process engine | {engine_seconds:.1f} | {engine_rate:.0f} | 100% |")
    print(f"| batch job (Ray up) | {summary['seconds']:.1f} | {job_rate:.0f} | {100 * job_rate / engine_rate:.0f}% |")
    print(f"| batch job + Ray start | {summary['seconds'] + ray_seconds:.1f} | {with_ray:.0f} | "
          f"{100 * with_ray / engine_rate:.0f}% |")
    print(f"| batch job, time in blocks | {summary['actor_seconds']:.1f} | {in_blocks:.0f} | "
          f"{100 * in_blocks / engine_rate:.0f}% |")


if __name__ == "__main__":
    main()
