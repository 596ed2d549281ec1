"""``camscope demo``: the whole system on the bundled demo project, as a newcomer meets it.

Models (trained once, cached) -> local Ray -> batch job into a store (resumed on a second run) ->
Serve endpoint -> Gradio UI; prints a progress line as each stage begins, then the URLs, and waits.
Ctrl-C or SIGTERM at any stage stops everything it started within seconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from camscope import store as store_module
from camscope.project import ProjectError

DEMO_PROJECT = "camscope.demo:project"
#: The stop (UI, Serve, Ray) is given this long from the signal; then whatever is left is killed.
STOP_S = 6.0
_stopping = threading.Event()
_watchdog: threading.Timer | None = None


class DemoError(ValueError):
    """A condition that stops the demo before it starts, with a one-line message."""


def default_store(project: str = DEMO_PROJECT) -> Path:
    """Where the demo keeps its store: $CAMSCOPE_CACHE/demo-store (default ~/.cache/camscope); another
    ``--project`` gets its own, demo-store-<module>."""
    cache = os.environ.get("CAMSCOPE_CACHE") or Path.home() / ".cache" / "camscope"
    name = "demo-store" if project == DEMO_PROJECT else f"demo-store-{project.split(':')[0].rsplit('.', 1)[-1]}"
    return Path(cache) / name


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise DemoError if ``host:port`` cannot be bound (another program holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Servers set SO_REUSEADDR too: a port in TIME_WAIT is free for them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise DemoError(f"port {port} on {host} is already in use; free it or pass --{what}-port") from None


def check_store(out: Path | str, fresh: bool) -> None:
    """Start over with ``--fresh``; refuse a store that another camscope version wrote."""
    if fresh:
        store_module.remove_store(out)
    try:
        store_module.check_schema(out)
    except store_module.StoreError as error:
        raise DemoError(f"{error} (at {out}); run `camscope demo --fresh` to rebuild it") from None


def bring_up(args: argparse.Namespace, started: dict) -> dict:
    """Train (or load) the models, run the batch job, start Serve and the UI; return the URLs.

    Each stage prints one ``camscope demo: ...`` line as it begins. What has started is recorded in
    ``started`` as it starts (``"ray"``, ``"ui"``), so that an interruption at any stage stops exactly that.
    """
    from camscope.project import load_project

    spec = getattr(args, "project", None) or DEMO_PROJECT
    out = store_module.store_path(args.out) if args.out else default_store(spec)
    check_port_free(args.host, args.api_port, "api")
    if not args.no_ui:
        check_port_free(args.host, args.ui_port, "ui")
    check_store(out, args.fresh)

    project = load_project(spec)
    for run in project.runs:
        # Here rather than inside the job's actors: one process trains, on the main thread, where Ctrl-C lands.
        say(f"preparing model run {run!r} (trained on first use, about a minute; then loaded from the cache)")
        project.model(run)

    from serve import app as serve_app
    from workflows.batch_job import format_summary, run_job

    say("starting a local Ray instance")
    started["ray"] = True
    serve_app.init_ray("local")  # workers at normal priority: the replica shares the CPU with the UI
    catch_signals()  # ray.init installs its own SIGTERM handler, which exits without stopping anything
    limit = None if args.all_samples else args.limit
    say(f"explaining the demo project into {out} "
        f"({'every sample' if limit is None else f'{limit} samples per slice'}; cached work is reused)")
    summary = run_job(spec, out, limit=limit)
    print(format_summary(summary), flush=True)

    say("starting the Serve endpoint")
    api = serve_app.start(spec, store=str(out), host=args.host, port=args.api_port)
    catch_signals()
    urls = {"api": api, "docs": f"{api}/docs", "store": str(out)}
    if not args.no_ui:
        from ui import app as ui_app

        say("starting the UI")
        started["ui"] = ui_app.launch(store=str(out), api=api, host=args.host, port=args.ui_port,
                                      project=spec)
        urls["ui"] = f"http://{args.host}:{args.ui_port}/"
        catch_signals()
    return {"urls": urls, "summary": summary}


def say(message: str) -> None:
    """One progress line: the stage the demo is entering."""
    print(f"camscope demo: {message}", flush=True)


def shut_down(started: dict) -> None:
    """Stop the UI and the Ray instance this process started (Serve runs inside it), within
    :data:`STOP_S` seconds: whatever is still running then is killed."""
    begun = time.monotonic()
    _start_watchdog()
    try:
        if started.get("ui") is not None:
            started["ui"].close()
        if started.get("ray"):
            import ray

            # No serve.shutdown(): it drains replicas gracefully (up to 20 s each), and the Ray instance
            # that holds them is ours to end anyway.
            ray.shutdown()
    finally:
        _watchdog.cancel()
    _kill_children()
    if started:
        say(f"stopped in {time.monotonic() - begun:.1f}s")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (read from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_children() -> None:
    for pid in _children(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_watchdog() -> None:
    """From the first signal (or the start of the stop) on, the stop has STOP_S seconds."""
    global _watchdog
    if _watchdog is None:
        _watchdog = threading.Timer(STOP_S, _kill_children_and_exit)
        _watchdog.daemon = True
        _watchdog.start()


def _kill_children_and_exit() -> None:
    print(f"camscope demo: the stop took over {STOP_S:.0f}s; killing what is left", file=sys.stderr, flush=True)
    _kill_children()
    os._exit(0)  # the stop that was asked for is done


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


def catch_signals() -> None:
    """Make Ctrl-C and SIGTERM interrupt whatever the main thread is doing (training, the batch job,
    startup, waiting); called again after each library that installs handlers of its own."""
    if not _stopping.is_set():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _interrupt)


def _interrupt(signum, _frame) -> None:
    _stopping.set()
    _start_watchdog()  # even if a library swallows the KeyboardInterrupt, everything stops in time
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)  # one stop: a second Ctrl-C must not cut the cleanup short
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of ``camscope demo``: 0 after a clean stop (Ctrl-C or SIGTERM at any stage), 2 on a
    condition that prevents starting."""
    catch_signals()
    started: dict = {}
    try:
        up = bring_up(args, started)
        print_welcome(up["urls"])
        if args.exit_after_start:
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping")
        return 0
    except (DemoError, ProjectError, store_module.StoreError) as error:
        print(f"camscope demo: {error}", file=sys.stderr)
        return 2
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # the stop itself is bounded by STOP_S, not interruptible
        shut_down(started)
