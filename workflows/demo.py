"""``camscope demo``: the whole system on the bundled demo project, as a newcomer meets it.

Local Ray -> batch job into a store (resumed on a second run) -> Serve endpoint -> Gradio UI; prints
the URLs and waits; Ctrl-C or SIGTERM stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from camscope import store as store_module
from camscope.project import ProjectError

DEMO_PROJECT = "camscope.demo:project"


class DemoError(ValueError):
    """A condition that stops the demo before it starts, with a one-line message."""


def default_store() -> Path:
    """Where the demo keeps its store: $CAMSCOPE_CACHE/demo-store (default ~/.cache/camscope)."""
    cache = os.environ.get("CAMSCOPE_CACHE") or Path.home() / ".cache" / "camscope"
    return Path(cache) / "demo-store"


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise DemoError if ``host:port`` cannot be bound (another program holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Servers set SO_REUSEADDR too: a port in TIME_WAIT is free for them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise DemoError(f"port {port} on {host} is already in use; free it or pass --{what}-port") from None


def check_store(out: Path, fresh: bool) -> None:
    """Start over with ``--fresh``; refuse a store that another camscope version wrote."""
    if fresh and out.exists():
        shutil.rmtree(out)
    try:
        store_module.check_schema(out)
    except store_module.StoreError as error:
        raise DemoError(f"{error} (at {out}); run `camscope demo --fresh` to rebuild it") from None


def bring_up(args: argparse.Namespace) -> dict:
    """Run the batch job, start Serve and the UI; return the URLs and the started UI."""
    import ray

    from serve import app as serve_app
    from workflows.batch_job import format_summary, run_job

    out = Path(args.out) if args.out else default_store()
    check_port_free(args.host, args.api_port, "api")
    if not args.no_ui:
        check_port_free(args.host, args.ui_port, "ui")
    check_store(out, args.fresh)

    print("camscope demo: starting a local Ray instance", flush=True)
    ray.init(include_dashboard=False, log_to_driver=False)
    limit = None if args.all_samples else args.limit
    print(f"camscope demo: explaining the demo project into {out} "
          f"({'every sample' if limit is None else f'{limit} samples per slice'}; cached work is reused)", flush=True)
    summary = run_job(DEMO_PROJECT, out, limit=limit)
    print(format_summary(summary), flush=True)

    print("camscope demo: starting the Serve endpoint", flush=True)
    api = serve_app.start(DEMO_PROJECT, store=str(out), host=args.host, port=args.api_port)
    urls = {"api": api, "docs": f"{api}/docs", "store": str(out)}
    ui = None
    if not args.no_ui:
        from ui import app as ui_app

        print("camscope demo: starting the UI", flush=True)
        ui = ui_app.launch(store=str(out), api=api, host=args.host, port=args.ui_port, project=DEMO_PROJECT)
        urls["ui"] = f"http://{args.host}:{args.ui_port}/"
    return {"urls": urls, "ui": ui, "summary": summary}


def shut_down(ui) -> None:
    """Stop the UI, Serve and the Ray instance this process started."""
    import ray
    from ray import serve

    if ui is not None:
        ui.close()
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def print_welcome(urls: dict) -> None:
    lines = ["", "camscope demo is up:"]
    if "ui" in urls:
        lines.append(f"  UI        {urls['ui']}")
    lines += [
        f"  API       {urls['api']}   (GET /healthz, POST /v1/analyze)",
        f"  API docs  {urls['docs']}",
        f"  store     {urls['store']}",
        "",
        "Try first: open the UI, click a dot in the population view, press Analyze, then move the",
        "Depth slider towards the input. Or ask the API:",
        f"  curl -s -X POST {urls['api']}/v1/analyze -H 'content-type: application/json' \\",
        "       -d '{\"run\": \"cnn\", \"slice\": \"validation\", \"sample_id\": \"4000\", \"labels\": [7]}'",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of ``camscope demo``: 0 after a clean stop, 2 on a condition that prevents starting."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = None
    try:
        started = bring_up(args)
        print_welcome(started["urls"])
        if args.exit_after_start:
            return 0
        while not stop.wait(0.5):
            pass
        print("camscope demo: stopping", flush=True)
        return 0
    except (DemoError, ProjectError, store_module.StoreError) as error:
        print(f"camscope demo: {error}", file=sys.stderr)
        return 2
    finally:
        shut_down(started["ui"] if started else None)
        time.sleep(0.2)
