"""Ray Serve's direct ingress for a single-replica service: the replica answers HTTP itself.

Through Serve's proxy a request costs two extra process hops (client -> proxy -> replica and back); on
two CPU cores that is about 5 ms per request (`GET /healthz` p50 5.9 ms through the proxy, 1.1 ms
direct: `benchmarks/results/serve.md`). With direct ingress the ingress replica runs its own HTTP server, so
a request goes from the client straight to the process that holds the model. Serve reads these
settings from the environment of its controller and of the replica, when each process starts.
"""

from __future__ import annotations

import socket

import ray


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment under which Serve's one ingress replica listens on ``port`` itself."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
        # The replica's HTTP server runs on its main event loop: the handlers (which hand the model work
        # to a thread) run there too, with no second loop and thread hop per request.
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        # No load balancer in front to drain from, and a restarted replica takes the port back at once.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


#: Serve controller settings in both modes: a proxy that takes more than 3 x 5 s to start (importing
#: Serve on two busy cores can) is otherwise killed and restarted, and the start fails.
CONTROLLER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def direct_replica_options(port: int) -> dict:
    """Ray actor options of the direct-ingress replica: its environment, and this node (the one whose
    ``host:port`` the service's URL names) as the only place it may run."""
    return {"runtime_env": {"env_vars": direct_ingress_env(port)},
            "resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}}


def serve_running() -> bool:
    """Whether the connected Ray cluster already runs Serve (whose settings a new service cannot change)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def spare_port(host: str) -> int:
    """A port of ``host`` that is free now (for Serve's proxy, which direct ingress leaves idle)."""
    return _bind(host, 0)


def ensure_free(host: str, port: int) -> None:
    """Raise OSError (naming the address) now if ``host:port`` is taken, rather than fail inside the replica."""
    try:
        _bind(host, port)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def _bind(host: str, port: int) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, port))
        return int(probe.getsockname()[1])
