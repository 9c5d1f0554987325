"""Ports: a free one outside the OS's automatic range, and the gateway's held while Ray starts."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slimserve.serve.ports import (
    RAY_WORKER_PORTS,
    PortInUseError,
    bound_socket,
    ephemeral_range,
    free_port,
    reserved_port,
)

ROOT = Path(__file__).resolve().parents[2]
AUTOMATIC_BINDS = 3000


def test_a_free_port_is_outside_the_automatic_range_and_ray_s_worker_ports():
    low, high = ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high and port not in RAY_WORKER_PORTS
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # free indeed


def test_a_reserved_port_is_left_to_the_gateway_s_listener_and_to_nothing_else():
    port = free_port()
    with reserved_port("127.0.0.1", port):
        # No automatic bind (Ray's servers) lands on it; a plain bind is refused.
        automatic = []
        try:
            for _ in range(AUTOMATIC_BINDS):
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                automatic.append(sock)
            assert port not in {sock.getsockname()[1] for sock in automatic}
        finally:
            for sock in automatic:
                sock.close()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        # The gateway replica's listener binds and listens there while the hold lasts.
        listening = bound_socket("127.0.0.1", port)
        try:
            listening.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        finally:
            listening.close()


def test_a_port_something_listens_on_cannot_be_reserved():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with (
            pytest.raises(PortInUseError, match=f"127.0.0.1:{port}"),
            reserved_port("127.0.0.1", port),
        ):
            pass


def test_serve_on_a_busy_port_fails_before_ray_starts_and_says_why():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        command = [sys.executable, "-m", "slimserve.serve.cli", "serve"]
        command += ["deploy/configs/default.yaml", "--port", str(port)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"slimserve: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Started a local Ray instance" not in done.stderr
