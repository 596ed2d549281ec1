"""Serve on a running cluster: an application builder for ``serve run`` / ``serve deploy``.

    serve run serve.deploy:app project=camscope.demo:project store=s3://bucket/camscope/demo-store
    serve deploy serve_config.yaml        # the same, as a Serve config file (see README)

Arguments (all strings, as Serve passes them): ``project`` (module:attribute, required), ``store``
(a directory or URI; default ``$CAMSCOPE_STORE``), ``replicas``, ``gpus_per_replica``, ``token``
(default ``$CAMSCOPE_TOKEN``). Replicas read the store on S3 with the node's credentials. Requests
reach the replicas through Serve's HTTP proxy, which spreads them over replicas and nodes (a local
``camscope serve`` with one replica answers through direct ingress instead: ``serve/direct.py``).
"""

from __future__ import annotations

import os
from typing import Any

from serve.app import TOKEN_ENV, build


def app(args: dict[str, str]) -> Any:
    """The bound camscope application built from ``serve run`` / Serve-config arguments."""
    if not args.get("project"):
        raise ValueError("serve.deploy:app needs project=module:attribute")
    return build(args["project"], store=args.get("store") or os.environ.get("CAMSCOPE_STORE") or None,
                 replicas=int(args.get("replicas", 1)), num_gpus=float(args.get("gpus_per_replica", 0)),
                 token=args.get("token") or os.environ.get(TOKEN_ENV) or None)
