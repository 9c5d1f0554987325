"""How slimserve runs Ray Serve's own processes.

Ray Serve's throughput-optimized mode runs each replica's user code and its handle router on
the replica's own event loop (no thread hop per streamed item) and talks to replicas over gRPC.
Every streamed token crosses the Serve hop replica -> gateway (and gateway -> proxy on a
cluster), so on a small machine this is CPU the engine gets back (loadtests/README.md, "Gateway
overhead", measures it per process).

Its direct ingress (the ingress replica listening itself, no proxy) stays off: it binds a port
from Serve's own range without SO_REUSEADDR, so an ingress replica restarted after a crash under
traffic cannot bind again and Serve blocks the port for good. A local `slimserve serve` gets the
same hop removed by the gateway's own listener (serve/api/listener.py). Logging stays as
Serve's default.

These are read from the environment when each Ray process imports Serve, so they must be set
before Ray starts: `run_local` sets them for a local Ray; a cluster sets them on every node
(deploy/Dockerfile, hence the KubeRay pods). A value already in the environment wins.
"""

from __future__ import annotations

import os

SERVE_ENVIRONMENT: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    # The mode would keep replica logs off the console and buffer 1000 lines of them, which a
    # killed replica loses: logs stay as they were.
    "RAY_SERVE_LOG_TO_STDERR": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # Handle calls go over gRPC in this mode, whose replica servers take 4 MiB messages by
    # default; a shadow comparison's log-probabilities (tokens x vocabulary) are far larger.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
    # Serve's controller loop (10 passes a second by default) and each replica's and router's
    # export of Serve's own cached metrics (every 100 ms) poll whether or not anything changed:
    # ~4% of a core on an idle local gateway, and at one stream half of Ray's CPU per token
    # (loadtests/README.md). Half a second still restarts a dead replica or applies a scaling
    # decision well within a health check period (10 s); slimserve's own metrics are not these.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def apply_serve_environment() -> dict[str, str]:
    """Set slimserve's Ray Serve settings where the environment does not name them; returns
    the values in force."""
    for name, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in SERVE_ENVIRONMENT}
