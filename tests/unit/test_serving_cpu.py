"""loadtests/serving_cpu.py: which process is which stage, and CPU counted only over the
processes alive at both snapshots."""

from __future__ import annotations

import pytest

from slimserve.loadtests.serving_cpu import STAGES, _names, _spent

REPLICA = "ServeReplica:slimserve:variant-full"


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("ray::ServeReplica:slimserve:variant-full", True),
        (
            "ray::SERVE_REPLICA::slimserve#variant-full#ab12:ServeReplica:slimserve:variant-full"
            ".__init__",
            True,
        ),
        ("ray::ServeReplica:slimserve:variant-full8", False),
        ("ray::ServeReplica:slimserve:variant-int8", False),
    ],
)
def test_a_ray_title_names_its_actor_whatever_call_runs(title, expected):
    assert _names(REPLICA, title) is expected


def test_cpu_counts_only_processes_seen_at_both_snapshots():
    before = {pid: (stage, 10.0) for pid, stage in enumerate(STAGES)}
    after = {pid: (stage, 10.5) for pid, stage in enumerate(STAGES)}
    after[99] = ("engine process", 40.0)  # started mid-run: its start-up is not this load's
    spent = _spent(before, after)
    assert spent == pytest.approx(dict.fromkeys(STAGES, 0.5))


def test_a_stage_without_a_process_is_an_error():
    snapshot = {0: ("client", 1.0)}
    with pytest.raises(RuntimeError, match="no process found"):
        _spent(snapshot, snapshot)


def test_a_local_gateway_without_a_serve_proxy_is_measured():
    """A local `slimserve serve` runs no Serve proxy: that stage may be absent, no other."""
    stages = [stage for stage in STAGES if stage != "HTTP proxy"]
    snapshot = {pid: (stage, 1.0) for pid, stage in enumerate(stages)}
    assert "HTTP proxy" not in _spent(snapshot, snapshot)
