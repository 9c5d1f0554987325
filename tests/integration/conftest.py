"""Boots the real gateway (`slimserve serve`, real model, real Ray Serve) once per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "deploy/configs/default.yaml"
STARTUP_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    """Base URL of a running gateway on the default config."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("gateway") / "serve.log"
    command = [
        sys.executable,
        "-m",
        "slimserve.serve.cli",
        "serve",
        str(DEFAULT_CONFIG),
        "--port",
        str(port),
    ]
    log_file = log_path.open("w")
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
                pytest.fail(f"gateway exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not healthy in {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()}")
            time.sleep(1)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log_file.close()


@pytest.fixture(scope="session")
def server_log(gateway, tmp_path_factory) -> Path:
    return next(Path(tmp_path_factory.getbasetemp()).glob("gateway*/serve.log"))
