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
from serve.ingress import Ingress

APP_NAME = "camscope"
TOKEN_ENV = "CAMSCOPE_TOKEN"


def build(project_spec: str, store: str | None = None, replicas: int = 1, num_gpus: float = 0.0,
          token: str | None = None, batch_wait_s: float | None = None, runs: list[str] | None = None) -> Any:
    """The bound Serve application: ``replicas`` ingress replicas, each holding the model of every run
    in ``runs`` (default: all of the project's), so a request crosses only Serve's HTTP proxy."""
    project = load_project(project_spec)  # fail now, with the project's own message, rather than inside a replica
    for run in runs or ():
        project.run(run)  # ProjectError naming the known runs
    if store is not None:
        Store(store)  # ... and the store's
    return Ingress.options(
        num_replicas=replicas,
        # Replicas reserve no CPU so that the service fits a small machine; GPUs are reserved as asked.
        ray_actor_options={"num_cpus": 0, "num_gpus": num_gpus},
    ).bind(project_spec, store, token, batch_wait_s, list(runs) if runs else None)


def start(project_spec: str, store: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          replicas: int = 1, num_gpus: float = 0.0, token: str | None = None, batch_wait_s: float | None = None,
          runs: list[str] | None = None) -> str:
    """Deploy the application (starting a local Ray if none is running) and return its base URL
    once every replica is ready. Non-blocking: the service runs until :func:`stop`. ``batch_wait_s``
    overrides how long a batch of concurrent requests waits to fill (serve/worker.py's default);
    ``runs`` limits the service to those model runs (default: all)."""
    application = build(project_spec, store, replicas, num_gpus, token, batch_wait_s, runs)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name=APP_NAME, route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


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
