"""POST /v1/analyze over real HTTP (Ray Serve) against the in-process engine on the same samples:
p50 / p99 latency and throughput, single label and all labels, concurrency 1 and 8, JSON and binary
replies, for each batch wait, through direct ingress (``camscope serve``'s default: the replica
answers HTTP itself) and through Serve's HTTP proxy (several replicas, or a cluster); errors counted.

    python benchmarks/serve_bench.py [--project camscope.demo:project] [--run cnn] [--requests 48]
                                     [--port 18500] [--gpus 0] [--store DIR] [--batch-waits 0.001,0.005]
                                     [--paths direct,proxy]

The load is bounded (``--requests`` per case). The engine side times ``engine.explain`` on one
sample (what a request computes), and on batches of 8 (what batching can reach); the single-label
requests one at a time alternate with the engine on the same sample, so that the latency ratio
compares the two under the same machine load. Each client thread
keeps one connection (``http.client``, keep-alive), as a client that cares about latency does; the
client is light on purpose, since it shares the machine's cores with the service (``requests`` spent
about a millisecond of CPU per call, taken from the replica). ``GET /healthz`` over each path is the floor of that path
(HTTP, Serve and FastAPI; no model). Each ``--batch-waits`` value (how long ``@serve.batch`` waits
to fill a batch) is applied in place (the deployment's ``user_config``); the first value and the
first path are the ones the ratios are reported for. With ``--store``, requests for stored samples
(the fast path) are timed too. Prints the table and the two ratios with their floors (single-label
p50 over HTTP at most the engine's + 10 ms; concurrency 8 at least 40% of the engine's batched
samples/s), and writes benchmarks/results/serve.md and serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import http.client
from urllib.parse import urlsplit

import numpy as np
import orjson
import torch

from camscope.engine import CamEngine
from camscope.project import load_project
from camscope.store import Store

RESULTS = Path(__file__).parent / "results"
CONCURRENCY = (1, 8)
BATCH = 8
LATENCY_FLOOR_MS = 10.0     # single-label p50 over HTTP: at most the engine's p50 + this
THROUGHPUT_FLOOR = 0.40     # concurrency 8: at least this share of the engine's batch-8 samples/s
BINARY = {"Accept": "application/octet-stream"}


def summarize(latencies: list[float], wall: float, errors: int) -> dict:
    """p50 / p99 in milliseconds, throughput in requests per second."""
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_rps": len(latencies) / wall, "requests": len(latencies), "errors": errors}


def engine_case(engine: CamEngine, batches: list[dict], labels: list[int] | None, per_call: int) -> dict:
    """Time ``engine.explain`` over ``batches`` (each holding ``per_call`` samples) after one warm-up."""
    engine.explain(batches[0], labels=labels)
    latencies = []
    start = time.perf_counter()
    for batch in batches:
        begin = time.perf_counter()
        engine.explain(batch, labels=labels)
        latencies.append(time.perf_counter() - begin)
    result = summarize(latencies, time.perf_counter() - start, 0)
    result["throughput_rps"] *= per_call  # samples per second
    return result


class Client:
    """One keep-alive HTTP connection to the service (reconnects when the server closes it)."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.connection = http.client.HTTPConnection(self.host, self.port, timeout=120)

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None
                ) -> tuple[int, bytes]:
        """``(status, body)`` of one request."""
        data = None if body is None else orjson.dumps(body)
        sent = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
        try:
            return self._send(method, path, data, sent)
        except (http.client.HTTPException, ConnectionError):  # the server closed the idle connection
            self.connection.close()
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
            return self._send(method, path, data, sent)

    def _send(self, method: str, path: str, data: bytes | None, headers: dict) -> tuple[int, bytes]:
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        return response.status, response.read()


def healthz_case(base: str, count: int) -> dict:
    """GET /healthz one after another: the floor of the HTTP path (HTTP server + ingress, no model)."""
    client = Client(base)
    client.request("GET", "/healthz")
    latencies, errors = [], 0
    start = time.perf_counter()
    for _ in range(count):
        begin = time.perf_counter()
        errors += client.request("GET", "/healthz")[0] != 200
        latencies.append(time.perf_counter() - begin)
    return summarize(latencies, time.perf_counter() - start, errors)


def paired_case(engine: CamEngine, singles: list[dict], labels: list[int] | None, base: str, bodies: list[dict],
                headers: dict | None = None) -> tuple[dict, dict]:
    """One request at a time over HTTP, each right after the in-process engine explains the same sample:
    both see the same machine load, which on a shared machine changes from second to second."""
    client = Client(base)
    for body, batch in zip(bodies[:2], singles[:2]):  # warm-up
        engine.explain(batch, labels=labels)
        client.request("POST", "/v1/analyze", body, headers)
    engine_times, http_times, errors = [], [], 0
    start = time.perf_counter()
    for body, batch in zip(bodies, singles):
        begin = time.perf_counter()
        engine.explain(batch, labels=labels)
        engine_times.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        errors += client.request("POST", "/v1/analyze", body, headers)[0] != 200
        http_times.append(time.perf_counter() - begin)
    wall = time.perf_counter() - start
    return summarize(engine_times, wall, 0), summarize(http_times, wall, errors)


def http_case(base: str, bodies: list[dict], concurrency: int, headers: dict | None = None) -> dict:
    """Send ``bodies`` with ``concurrency`` client threads (one connection each); count non-200 replies."""
    return summarize(*timed_requests(base, bodies, concurrency, headers))


def timed_requests(base: str, bodies: list[dict], concurrency: int, headers: dict | None = None
                   ) -> tuple[list[float], float, int]:
    """``(latencies, wall seconds, errors)`` of :func:`http_case`."""
    local = threading.local()

    def send(body: dict) -> tuple[float, bool]:
        client = getattr(local, "client", None) or Client(base)
        local.client = client
        begin = time.perf_counter()
        try:
            ok = client.request("POST", "/v1/analyze", body, headers)[0] == 200
        except (http.client.HTTPException, OSError):
            ok = False
        return time.perf_counter() - begin, ok

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, bodies[: 2 * concurrency]))  # warm-up: connections, batch path, caches
        start = time.perf_counter()
        outcomes = list(pool.map(send, bodies))
        wall = time.perf_counter() - start
    return [t for t, _ in outcomes], wall, sum(not ok for _, ok in outcomes)


def alternating_http_cases(base: str, bodies: list[dict], concurrency: int, replies: dict[str, dict | None],
                           rounds: int = 4) -> dict[str, dict]:
    """:func:`http_case` for each reply kind (name -> request headers), in ``rounds`` slices of
    ``bodies`` taken in turn, the first kind alternating: whichever kind ran first used to pay for
    the switch of load (JSON at concurrency 8 measured 36% of the engine's rate first, 43% second)."""
    latencies: dict[str, list[float]] = {reply: [] for reply in replies}
    walls = dict.fromkeys(replies, 0.0)
    errors = dict.fromkeys(replies, 0)
    size = -(-len(bodies) // rounds)
    for r in range(rounds):
        part = bodies[r * size : (r + 1) * size]
        order = list(replies) if r % 2 == 0 else list(reversed(replies))
        for reply in order:
            times, wall, failed = timed_requests(base, part, concurrency, replies[reply])
            latencies[reply] += times
            walls[reply] += wall
            errors[reply] += failed
    return {reply: summarize(latencies[reply], walls[reply], errors[reply]) for reply in replies}


def set_batch_wait(seconds: float) -> None:
    """Apply a batch wait to the running (single) replica in place, through its ``reconfigure``."""
    from ray import serve

    from serve.app import APP_NAME

    serve.get_deployment_handle("Ingress", APP_NAME).reconfigure.remote({"batch_wait_s": seconds}).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="camscope.demo:project")
    parser.add_argument("--run", default=None, help="model run (default: the project's first)")
    parser.add_argument("--slice", default=None, help="data slice (default: the project's last)")
    parser.add_argument("--requests", type=int, default=48, help="requests per case (bounded load)")
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per model replica")
    parser.add_argument("--store", default=None, help="a store of the run: also time its fast path")
    parser.add_argument("--batch-waits", default="0.01,0.002",
                        help="comma-separated @serve.batch waits in seconds; the first is reported")
    parser.add_argument("--paths", default="direct,proxy",
                        help="direct (the replica answers HTTP; camscope serve's default) and/or proxy "
                             "(Serve's HTTP proxy in front); the first is reported")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    waits = [float(w) for w in args.batch_waits.split(",")]
    paths = args.paths.split(",")
    load_before = os.getloadavg()[0]


    from serve.app import init_ray, start, stop

    project = load_project(args.project)
    run = args.run or next(iter(project.runs))
    slice = args.slice or list(project.slices)[-1]
    stored = Store(args.store).sample_ids(run, slice) if args.store else []
    ids = [sid for sid in project.slices[slice].sample_ids if sid not in set(stored)][: args.requests]
    model = project.model(run)
    device = "cuda" if args.gpus > 0 and torch.cuda.is_available() else "cpu"
    model = model.to(device)
    engine = CamEngine(model)
    singles = [project.load_batch(slice, [sid]) for sid in ids]
    batches = [project.load_batch(slice, ids[i:i + BATCH]) for i in range(0, len(ids) - BATCH + 1, BATCH)]
    gts = [project.ground_truth(slice, sid) for sid in ids]

    cases: dict[tuple, dict] = {}  # (labels, path, concurrency[, the case an engine row alternated with])
    replica = None
    for first_path, path_name in enumerate(paths):
        headline = first_path == 0
        init_ray("local")  # a private instance, not a cluster, as `camscope serve` starts it
        try:
            for n, wait in enumerate(waits):
                if n == 0:
                    # The service holds the benchmarked run only, as `camscope serve` does for a one-run project.
                    base = start(args.project, store=args.store, port=args.port, num_gpus=args.gpus,
                                 batch_wait_s=wait, runs=[run], direct=path_name == "direct")
                else:  # what a new user_config does, without redeploying the replica
                    set_batch_wait(wait)
                if n == 0:
                    described = orjson.loads(Client(base).request("GET", "/v1/runs")[1])
                    replica = replica or next(r for r in described["runs"] if r["run"] == run)
                    torch.set_num_threads(replica["torch_threads"])  # the same CPU threads as the replica
                    cases[("-", f"{path_name}: http GET /healthz", 1)] = healthz_case(base, args.requests)
                for name, labels in (("single label", "gt"), ("all labels", "all")):
                    if (n > 0 or not headline) and labels == "all":
                        continue  # other waits and paths: the headline case only
                    engine_labels = None if labels == "all" else [gts[0]]
                    if n == 0 and headline:
                        cases[(name, "engine", 1)] = engine_case(engine, singles, engine_labels, 1)
                        cases[(name, f"engine batch {BATCH}", 1)] = engine_case(engine, batches, engine_labels, BATCH)
                    bodies = [{"run": run, "slice": slice, "sample_id": sid,
                               "labels": "all" if labels == "all" else [gts[0]]} for sid in ids]
                    replies = {"json": None, "binary": BINARY} if headline else {"json": None}
                    for concurrency in CONCURRENCY:
                        if concurrency == 1 and name == "single label":
                            for reply, headers in replies.items():
                                case = f"{path_name}: http {reply}, wait {wait * 1e3:g} ms"
                                paired, http = paired_case(engine, singles, engine_labels, base, bodies, headers)
                                cases[(name, f"engine, alternating with the row below", 1, case)] = paired
                                cases[(name, case, 1)] = http
                            continue
                        measured = alternating_http_cases(base, bodies, concurrency, replies)
                        for reply, result in measured.items():
                            cases[(name, f"{path_name}: http {reply}, wait {wait * 1e3:g} ms", concurrency)] = result
                    fast = [dict(body, sample_id=stored[i % len(stored)]) for i, body in enumerate(bodies)] if stored else []
                    for concurrency in CONCURRENCY if fast and n == 0 and headline else ():
                        cases[(name, f"{path_name}: http json, from store", concurrency)] = http_case(base, fast, concurrency)
        finally:
            stop()

    reported = f"{paths[0]}: http {{}}, wait {waits[0] * 1e3:g} ms"
    batched = cases[("single label", f"engine batch {BATCH}", 1)]
    ratios = []
    for reply in ("json", "binary"):
        http1 = cases[("single label", reported.format(reply), 1)]
        http8 = cases[("single label", reported.format(reply), 8)]
        single = cases[("single label", "engine, alternating with the row below", 1, reported.format(reply))]
        extra = http1["p50_ms"] - single["p50_ms"]
        share = http8["throughput_rps"] / batched["throughput_rps"]
        ratios += [
            f"single label, {reply}, concurrency 1: HTTP p50 {http1['p50_ms']:.1f} ms = engine p50 "
            f"{single['p50_ms']:.1f} ms + {extra:.1f} ms (floor: at most + {LATENCY_FLOOR_MS:g} ms) "
            f"{'OK' if extra <= LATENCY_FLOOR_MS else 'MISSED'}",
            f"single label, {reply}, concurrency 8: HTTP {http8['throughput_rps']:.0f} samples/s = "
            f"{share:.0%} of the engine's {batched['throughput_rps']:.0f} on batches of {BATCH} "
            f"(floor: at least {THROUGHPUT_FLOOR:.0%}) {'OK' if share >= THROUGHPUT_FLOOR else 'MISSED'}",
        ]

    header = (f"{args.project} run {run!r}, slice {slice!r}, {len(ids)} requests per case; replica on "
              f"{replica['device']} with {replica['torch_threads']} torch threads; {platform.machine()}, "
              f"{torch.get_num_threads()} threads in-process; {len(replica['layers'])} layers x 3 algorithms; "
              f"{os.cpu_count()} cores, load average {load_before:.1f} at the start and "
              f"{os.getloadavg()[0]:.1f} at the end")
    lines = [f"# /v1/analyze vs the in-process engine\n\n{header}\n",
             "| labels | path | concurrency | p50 ms | p99 ms | samples/s | errors |", "|---|---|---|---|---|---|---|"]
    for (name, path, concurrency, *_), r in cases.items():
        lines.append(f"| {name} | {path} | {concurrency} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['throughput_rps']:.1f} | {r['errors']} |")
    lines += ["", f"Ratios ({reported.format('json/binary')}; the service's default):", ""] + [f"- {line}" for line in ratios]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.md").write_text(table)
    (args.out / "serve.json").write_text(json.dumps(
        {"setup": header, "ratios": ratios, "cases": [{"labels": k[0], "path": k[1], "concurrency": k[2], **v} for k, v in cases.items()]},
        indent=2))
    print(f"wrote {args.out / 'serve.md'}")


if __name__ == "__main__":
    main()
