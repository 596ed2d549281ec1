"""``camscope serve``: the Ray Serve application (one ingress deployment holding every run's model).

Examples:
    >>> base = start("camscope.demo:project", port=18000)     # non-blocking; returns the base URL
    >>> requests.post(base + "/v1/analyze", json={"run": "cnn", "slice": "validation", "sample_id": "4000"})
    >>> stop()
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import ray
from ray import serve

from camscope.project import load_project
from camscope.store import Store
from serve.direct import CONTROLLER_ENV, direct_ingress_env, direct_replica_options, ensure_free, serve_running, spare_port
from serve.ingress import Ingress

APP_NAME = "camscope"
TOKEN_ENV = "CAMSCOPE_TOKEN"
WORKER_NICENESS = "RAY_worker_niceness"


def build(project_spec: str, store: str | None = None, replicas: int = 1, num_gpus: float = 0.0,
          token: str | None = None, batch_wait_s: float | None = None, runs: list[str] | None = None,
          replica_options: dict[str, Any] | None = None) -> Any:
    """The bound Serve application: ``replicas`` ingress replicas, each holding the model of every run
    in ``runs`` (default: all of the project's), so a request crosses at most Serve's HTTP proxy.
    ``batch_wait_s`` goes in the deployment's ``user_config`` (changing it reconfigures the replicas
    in place); ``replica_options`` are more Ray actor options of the replicas (see
    :func:`serve.direct.direct_replica_options`)."""
    check(project_spec, store, runs)
    options: dict[str, Any] = {
        "num_replicas": replicas,
        # Replicas reserve no CPU so that the service fits a small machine; GPUs are reserved as asked.
        "ray_actor_options": {"num_cpus": 0, "num_gpus": num_gpus} | (replica_options or {}),
    }
    if batch_wait_s is not None:
        options["user_config"] = {"batch_wait_s": batch_wait_s}
    return Ingress.options(**options).bind(project_spec, store, token, list(runs) if runs else None)


def check(project_spec: str, store: str | None = None, runs: list[str] | None = None) -> None:
    """Fail now, with the project's or the store's own message, rather than inside a replica."""
    project = load_project(project_spec)
    for run in runs or ():
        project.run(run)  # ProjectError naming the known runs
    if store is not None:
        Store(store)


def start(project_spec: str, store: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          replicas: int = 1, num_gpus: float = 0.0, token: str | None = None, batch_wait_s: float | None = None,
          runs: list[str] | None = None, direct: bool | None = None) -> str:
    """Deploy the application (starting a local Ray if none is running) and return its base URL
    once every replica is ready. Non-blocking: the service runs until :func:`stop`. ``batch_wait_s``
    overrides how long a batch of concurrent requests waits to fill (serve/worker.py's default);
    ``runs`` limits the service to those model runs (default: all).

    ``direct`` (default: when there is one replica and this call starts Serve) uses Serve's direct
    ingress: the replica, on this node, itself answers HTTP on ``port``, with no proxy hop (Serve's
    proxy then listens on a spare port of ``host``). Otherwise Serve's proxy answers on ``port`` and
    spreads requests over the replicas."""
    check(project_spec, store, runs)
    if not ray.is_initialized():
        init_ray(os.environ.get("RAY_ADDRESS"))
    if direct is None:
        direct = replicas == 1 and not serve_running()
    if direct:
        ensure_free(host, port)
    application = build(project_spec, store, replicas, num_gpus, token, batch_wait_s, runs,
                        direct_replica_options(port) if direct else None)
    serve.start(http_options={"host": host, "port": spare_port(host) if direct else port},
                controller_options={"runtime_env": {"env_vars": CONTROLLER_ENV | (direct_ingress_env(port) if direct else {})}})
    serve.run(application, name=APP_NAME, route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def init_ray(address: str | None = None) -> None:
    """``ray.init`` for a service: when it starts a local Ray, its workers (the replica among them) run at
    normal CPU priority. Ray's default lowers them to nice 15, under which the replica lost the CPU to
    its own HTTP clients and to any other work on a two-core machine."""
    os.environ.setdefault(WORKER_NICENESS, "0")  # read by the raylet that ray.init starts
    ray.init(address=address, include_dashboard=False, log_to_driver=False)


def stop() -> None:
    """Shut the Serve application down (the Ray instance this process started goes with it)."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def run_cli(args) -> int:
    """Entry point of ``camscope serve``: start, print the URLs, serve until interrupted."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    base = start(args.project, store=args.store, host=args.host, port=args.port,
                 replicas=args.replicas, num_gpus=args.gpus_per_replica, token=token)
    print(f"camscope serve: listening on {base} (API docs: {base}/docs)", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
