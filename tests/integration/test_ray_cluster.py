"""Scale-out on a Ray cluster: a head and a second node started with `ray start` on this machine
(each with its own resources), replicas of one variant placed on both and serving through one
gateway, and serving that goes on when the second node is stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slimserve.serve.app import APP_NAME, build_application
from slimserve.serve.config import parse_config
from slimserve.serve.ports import free_port
from slimserve.serve.ray_settings import SERVE_ENVIRONMENT

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.xdist_group("ray")]

MODEL = "smollm2-135m-instruct"
RAY = str(Path(sys.executable).parent / "ray")
# `ray start` turns token authentication on by default, which this process's Ray client (and
# `ray status`) would then need; a loopback test cluster goes without. Every node gets
# slimserve's Ray Serve settings, as the image gives the KubeRay pods.
RAY_ENV = {
    **os.environ,
    **SERVE_ENVIRONMENT,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


def _ray_start(log: Path, *args: str) -> subprocess.Popen:
    """A node that lives as long as this process group (`ray start --block`)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=RAY_ENV,
        )


def _stop(node: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=60)


def _until(predicate, limit: float, what: str):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            result = predicate()
            if result:
                return result
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@contextlib.contextmanager
def _two_nodes(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    # Short: Ray's socket paths live under it and must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    # Each node has one "slot": a variant replica needs one, so there is one per node. Only the
    # head has "gateway", where the gateway replica is pinned.
    head = _ray_start(
        tmp_path / "head.log",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--resources=" + json.dumps({"slot": 1, "gateway": 1}),
    )
    address = f"127.0.0.1:{port}"
    worker = None
    try:
        _until(
            lambda: (
                subprocess.run(
                    [RAY, "status", f"--address={address}"], capture_output=True
                ).returncode
                == 0
            ),
            120,
            "the head node",
        )
        worker = _ray_start(
            tmp_path / "worker.log",
            f"--address={address}",
            "--num-cpus=2",
            "--resources=" + json.dumps({"slot": 1}),
        )
        yield address, worker
    finally:
        if worker is not None:
            _stop(worker, signal.SIGTERM)
        _stop(head, signal.SIGTERM)
        _stop(head, signal.SIGKILL)


def _chat(base: str) -> httpx.Response:
    body = {"model": f"{MODEL}:full", "messages": [{"role": "user", "content": "Hi"}]}
    return httpx.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=120)


def test_replicas_on_two_nodes_serve_through_one_gateway_and_survive_a_node(tmp_path):
    import ray
    from ray import serve

    config = parse_config(
        {
            "model": MODEL,
            "variants": {
                "full": {
                    "deployment": {"replicas": 2, "num_cpus": 1, "resources": {"slot": 1}},
                }
            },
            "engine": {"max_num_seqs": 4, "max_model_len": 512, "separate_process": False},
            "self_bench": {"enabled": False},
            "server": {"gateway_resources": {"gateway": 0.01}},
        }
    )
    with _two_nodes(tmp_path) as (address, worker):
        ray.init(address=address, log_to_driver=False)
        try:
            _until(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, 120, "the second node")
            port = free_port()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_application(config), name=APP_NAME, route_prefix="/")
            base = f"http://127.0.0.1:{port}"

            # Each stats probe through the gateway reaches one replica: both nodes answer.
            nodes = {
                httpx.get(f"{base}/v1/variants", timeout=30).json()["variants"]["full"]["node_id"]
                for _ in range(30)
            }
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert nodes == alive, (nodes, alive)

            answers = [_chat(base) for _ in range(8)]
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]

            _stop(worker, signal.SIGKILL)  # the second node goes away, its replica with it
            answers = [_chat(base) for _ in range(8)]
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            health = httpx.get(f"{base}/health", timeout=30).json()
            assert health["variants"]["full"]["state"] == "up"
        finally:
            serve.shutdown()
            ray.shutdown()
