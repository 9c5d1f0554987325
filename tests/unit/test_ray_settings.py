"""slimserve's Ray Serve settings: set before Ray starts, a user's own value kept, and the image
(hence every KubeRay node) carrying the same ones."""

from __future__ import annotations

import re
from pathlib import Path

from slimserve.serve.ray_settings import SERVE_ENVIRONMENT, apply_serve_environment

ROOT = Path(__file__).resolve().parents[2]


def test_settings_fill_the_environment_and_keep_a_users_value(monkeypatch):
    for name in SERVE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    in_force = apply_serve_environment()
    assert in_force["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert (
        in_force["RAY_SERVE_ENABLE_DIRECT_INGRESS"]
        == SERVE_ENVIRONMENT["RAY_SERVE_ENABLE_DIRECT_INGRESS"]
    )


def test_the_image_sets_the_same_settings():
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    set_there = dict(re.findall(r"\b(RAY_SERVE_[A-Z_]+)=(\S+)", dockerfile))
    assert set_there == SERVE_ENVIRONMENT
