"""loadtests/overhead_bench.py: each goal judged on the median over rounds of its per-round
comparison, and a config trimmed to the measured variant that still validates."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from slimserve.loadtests.decode_bench import BenchRow
from slimserve.loadtests.overhead_bench import LONG, SHORT, Round, alone, goals, loads, render
from slimserve.serve.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _row(ttft_ms: float = 20.0, per_stream: float = 100.0, tok_s: float = 100.0) -> BenchRow:
    return BenchRow(
        variant="full",
        concurrency=1,
        requests=1,
        output_tokens=64,
        seconds=1.0,
        output_tokens_per_s=tok_s,
        per_stream_tokens_per_s=per_stream,
        ttft_p50_ms=ttft_ms,
    )


def _args(**overrides) -> argparse.Namespace:
    values = dict(
        concurrency=[8],
        short_tokens=8,
        short_requests=4,
        tokens=64,
        long_requests=2,
        requests_per_stream=3,
    )
    return argparse.Namespace(**{**values, **overrides})


def _round(index: int, gateway: dict[str, BenchRow]) -> Round:
    in_process = {SHORT: _row(ttft_ms=20.0), LONG: _row(per_stream=100.0), "8 streams": _row()}
    return Round(index=index, first="in-process", in_process=in_process, gateway=gateway)


def test_loads_cover_one_stream_twice_and_every_stream_count():
    measured = loads(_args(concurrency=[8, 32]))
    assert [(m.name, m.concurrency, m.tokens, m.requests) for m in measured] == [
        (SHORT, 1, 8, 4),
        (LONG, 1, 64, 2),
        ("8 streams", 8, 64, 24),
        ("32 streams", 32, 64, 96),
    ]


def test_each_goal_takes_the_median_round_so_one_bad_round_does_not_decide_it():
    measured = loads(_args())
    rounds = [
        _round(
            1, {SHORT: _row(ttft_ms=24), LONG: _row(per_stream=96), "8 streams": _row(tok_s=91)}
        ),
        # A round the host slowed down in: every figure misses its goal.
        _round(
            2, {SHORT: _row(ttft_ms=40), LONG: _row(per_stream=50), "8 streams": _row(tok_s=50)}
        ),
        _round(
            3, {SHORT: _row(ttft_ms=23), LONG: _row(per_stream=97), "8 streams": _row(tok_s=92)}
        ),
    ]
    ttft, itl, throughput = goals(rounds, measured)
    assert ttft.values == pytest.approx([4.0, 20.0, 3.0]) and ttft.median == pytest.approx(4.0)
    assert ttft.met
    assert itl.median == pytest.approx(100 / 96) and itl.met
    assert throughput.values == pytest.approx([0.91, 0.5, 0.92]) and throughput.met


def test_a_goal_missed_in_most_rounds_is_not_met():
    measured = loads(_args())
    slow = {SHORT: _row(ttft_ms=26.0), LONG: _row(per_stream=90.0), "8 streams": _row(tok_s=80)}
    rounds = [_round(index, dict(slow)) for index in (1, 2, 3)]
    results = goals(rounds, measured)
    assert [goal.met for goal in results] == [False, False, False]
    table = render(rounds, measured, results)
    assert (
        "| TTFT p50 overhead, ms (one stream, short answers) | < 5 | 6.00 / 6.00 / 6.00 |" in table
    )
    assert table.count("| no |") == 3


def test_a_variant_alone_keeps_its_settings_and_drops_what_names_the_others(tmp_path):
    trimmed = alone(REPO / "deploy/configs/default.yaml", "full", tmp_path)
    config = load_config(trimmed)
    assert list(config.variants) == ["full"]
    original = yaml.safe_load((REPO / "deploy/configs/default.yaml").read_text())
    assert yaml.safe_load(trimmed.read_text())["engine"] == original["engine"]


def test_a_variant_the_config_lacks_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no variant 'missing'.*full, int8"):
        alone(REPO / "deploy/configs/default.yaml", "missing", tmp_path)
