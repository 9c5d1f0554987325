"""Measurements a replica takes about itself at startup (the device's matmul peak, the
self-benchmark), kept on disk under a key of everything they depend on, so that a restarted
replica on the same machine is back in seconds instead of measuring again."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from slimserve.kernels import cpu_isa
from slimserve.models.paths import cache_root

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Of every source file of the package: a measurement by other code is taken again."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for folder in ("serve", "models", "kernels", "compression"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def machine_identity() -> dict[str, Any]:
    """What a measurement of this machine depends on besides its own inputs."""
    return {
        "code": code_digest(),
        "cpu": _cpu_model(),
        "cpu_isa": cpu_isa.describe(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measurement_key(kind: str, inputs: dict[str, Any]) -> str:
    identity = {"kind": kind, "inputs": inputs, "machine": machine_identity()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_root() / "measurements" / f"{key}.json"


def recall(key: str) -> Any | None:
    """A stored measurement, None when there is none (or it cannot be read)."""
    try:
        return json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None


def remember(key: str, value: Any) -> None:
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(value))
    os.replace(scratch, path)  # concurrent writers: last one wins, each file whole
