"""Boots real gateways (`slimserve serve`: real model, real Ray Serve, real HTTP) for the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slimserve.serve.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "deploy/configs"
STARTUP_TIMEOUT_S = 600


@contextlib.contextmanager
def running_gateway(config: Path, log_path: Path) -> Iterator[str]:
    """Start `slimserve serve CONFIG` on a free port; yield its base URL once /health says 200."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "slimserve.serve.cli",
        "serve",
        str(config),
        "--port",
        str(port),
    ]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        f"gateway exited with {process.returncode}:\n{log_path.read_text()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"gateway not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()}"
                    )
                time.sleep(1)
            yield base
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    # Reached when the tests raised nothing: SIGTERM (what Kubernetes and systemd send) must
    # stop the gateway through Serve's graceful shutdown, not abort it.
    if process.returncode != 0:
        pytest.fail(
            f"gateway exited {process.returncode} on SIGTERM:\n{log_path.read_text()[-4000:]}"
        )


def assert_disconnect_frees_slot(base: str, model: str, variant: str) -> dict:
    """Leave a long stream after a few chunks; the variant must report nothing running.

    Returns the variant's last stats.
    """
    body = {
        "model": f"{model}:{variant}",
        "prompt": "Once upon a time",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/completions", json=body) as response:
            for index, _ in enumerate(response.iter_lines()):
                if index > 5:
                    break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = http.get(f"{base}/v1/variants").json()["variants"][variant]
            if stats["engine"]["running"] == 0:
                break
            time.sleep(0.2)
    assert stats["engine"]["running"] == 0
    return stats


@pytest.fixture(scope="session")
def gateway_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway") / "serve.log"


@pytest.fixture(scope="session")
def gateway(gateway_log) -> Iterator[str]:
    """The default config: full + int8 on the torch engine."""
    with running_gateway(CONFIGS / "default.yaml", gateway_log) as base:
        yield base
