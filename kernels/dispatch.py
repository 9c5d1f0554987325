"""Backend choice per op, logged once so a variant's stats say what really ran."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_chosen: dict[str, str] = {}
_lock = threading.Lock()


def record_backend(op: str, backend: str) -> None:
    key = f"{op}:{backend}"
    if key in _chosen:
        return
    with _lock:
        if key not in _chosen:
            _chosen[key] = backend
            log.info("kernel %s runs on backend %s", op, backend)


def chosen_backends() -> dict[str, list[str]]:
    by_op: dict[str, list[str]] = {}
    for key in sorted(_chosen):
        op, backend = key.split(":", 1)
        by_op.setdefault(op, []).append(backend)
    return by_op


def merged_backends(*parts: dict[str, list[str]]) -> dict[str, list[str]]:
    """Backends recorded in several processes (a replica and its engine process), per op."""
    by_op: dict[str, set[str]] = {}
    for part in parts:
        for op, backends in part.items():
            by_op.setdefault(op, set()).update(backends)
    return {op: sorted(by_op[op]) for op in sorted(by_op)}
