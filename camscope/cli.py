"""The ``camscope`` command line. Each sub-command hands its parsed arguments to an adapter
(``workflows``, ``serve``, ``ui``) imported only when that command runs, so ``camscope --help`` is fast
and the core never imports Ray or Gradio."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

DEMO_PROJECT = "camscope.demo:project"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="camscope",
        description="CAM heatmaps at every layer, label and input: batch job, HTTP endpoint and UI.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole system on the bundled demo project")
    demo.add_argument("--out", default=None,
                      help="store: a directory or s3://bucket/prefix (default: ~/.cache/camscope/demo-store)")
    demo.add_argument("--project", default=DEMO_PROJECT,
                      help="module:attribute of the project to show (bundled: camscope.demo:project, "
                           "camscope.demo_signals:project)")
    demo.add_argument("--limit", type=_positive_int, default=64, help="samples per slice for the batch job")
    demo.add_argument("--all", dest="all_samples", action="store_true", help="explain every sample")
    demo.add_argument("--fresh", action="store_true", help="discard the demo store and start over")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--api-port", type=_port, default=8000)
    demo.add_argument("--ui-port", type=_port, default=7860)
    demo.add_argument("--no-ui", action="store_true", help="start the batch job and API only")
    demo.add_argument("--exit-after-start", action="store_true", help=argparse.SUPPRESS)

    run = commands.add_parser("run", help="explain a project's slices with Ray Data into a Parquet store")
    run.add_argument("--project", required=True, help="module:attribute naming a camscope Project")
    run.add_argument("--out", default=os.environ.get("CAMSCOPE_STORE"), required=not os.environ.get("CAMSCOPE_STORE"),
                     help="store: a directory or a URI such as s3://bucket/prefix (default: $CAMSCOPE_STORE)")
    run.add_argument("--run", action="append", default=None, help="model run (repeatable; default all)")
    run.add_argument("--slice", action="append", default=None, help="data slice (repeatable; default all)")
    run.add_argument("--workers", type=_positive_int, default=None,
                     help="actors in the pool (default: one per GPU with --gpus-per-worker, else one per CPU core)")
    run.add_argument("--gpus-per-worker", type=_non_negative_float, default=0.0)
    run.add_argument("--batch-size", type=_positive_int, default=16, help="samples per engine call")
    run.add_argument("--shard-size", type=_positive_int, default=None,
                     help="samples per stored shard, for a new store only (default 64)")
    run.add_argument("--limit", type=_positive_int, default=None, help="at most N samples per slice")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    run.add_argument("--faithfulness", action="store_true",
                     help="also store a per-map faithfulness score (probability drop when the map's hottest "
                          "10%% of input pixels are zeroed) for each sample's predicted label")

    serve = commands.add_parser("serve", help="answer on-demand analysis over HTTP (Ray Serve)")
    serve.add_argument("--project", required=True, help="module:attribute naming a camscope Project")
    serve.add_argument("--store", default=None, help="store (directory or URI such as s3://bucket/prefix) for the fast path")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--replicas", type=_positive_int, default=1)
    serve.add_argument("--gpus-per-replica", type=_non_negative_float, default=0.0)
    serve.add_argument("--token", default=None, help="bearer token required by the API (or CAMSCOPE_TOKEN)")

    ui = commands.add_parser("ui", help="explore the store and the API in a browser (Gradio)")
    ui.add_argument("--api", default=None, help="base URL of a camscope serve endpoint")
    ui.add_argument("--store", default=None, help="store: a directory or a URI such as s3://bucket/prefix")
    ui.add_argument("--token", default=None, help="bearer token for a protected --api (or CAMSCOPE_TOKEN)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=_port, default=7860)
    return parser


ADAPTERS = {
    "demo": "workflows.demo",
    "run": "workflows.batch_job",
    "serve": "serve.app",
    "ui": "ui.app",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``camscope`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        adapter = importlib.import_module(ADAPTERS[args.command])
    except ImportError as error:
        print(f"camscope {args.command}: missing dependency: {error}", file=sys.stderr)
        return 2
    try:
        return int(adapter.run_cli(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"camscope {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
