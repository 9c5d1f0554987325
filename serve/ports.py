"""Ports for the servers this project starts: a free one for tests and benchmarks, and the
gateway's own, held from before Ray starts until the gateway replica listens on it.

A port the OS hands out (bind to port 0) lies in its ephemeral range, where every outgoing
connection and every server of Ray's that binds port 0 also draws theirs: between picking such a
port and binding it, one of Ray's processes can take it, and the gateway replica then fails to
start on it. So `free_port` picks outside that range (and outside Ray's worker ports), and
`reserved_port` keeps the gateway's port bound, not listening, while Ray starts: neither an
automatic bind nor an outgoing connection takes a port that a socket is bound to.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default, where the file cannot be read
RAY_WORKER_PORTS = range(10002, 20000)  # ray start's default --min/--max-worker-port
FIRST_CANDIDATE = RAY_WORKER_PORTS.stop
TRIES = 64


class PortInUseError(RuntimeError):
    """The port a server was asked to listen on is taken."""


def ephemeral_range() -> tuple[int, int]:
    """The OS's range for automatically assigned ports, both ends included."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing is bound to now on `host`, outside the ephemeral range and Ray's
    worker ports, so no automatically assigned port takes it before its server binds it."""
    low, high = ephemeral_range()
    candidates = [p for p in range(FIRST_CANDIDATE, 65536) if not low <= p <= high]
    for port in random.sample(candidates, min(TRIES, len(candidates))):
        if _bindable(host, port):
            return port
    with socket.socket() as probe:  # every candidate taken: let the OS pick one
        probe.bind((host, 0))
        return probe.getsockname()[1]


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEADDR, ready to listen (the gateway's listener;
    a restarted one binds again while the old connections wait out TIME_WAIT); OSError (the
    port taken) is the caller's."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[None]:
    """Hold host:port bound (not listening) for the block, as the gateway replica's listener
    binds it, so that listener can still listen there and nothing else can take it. Raises
    PortInUseError at once when something listens there or holds it bound."""
    try:
        hold = bound_socket(host, port)
    except OSError as error:
        raise PortInUseError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    with hold:
        yield
