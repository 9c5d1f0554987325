"""The capacity planner's arithmetic on synthetic measurements with known answers: the knee,
the SLO rate search, the recommendation and its cost, the validation verdict (split by
chi-square) and the files a plan writes."""

from __future__ import annotations

import math

import pytest
import yaml

from slimserve.loadtests.load_stats import SLO, RunSummary, summarize
from slimserve.loadtests.plan_compare import compare_table
from slimserve.loadtests.plan_report import (
    LoadShape,
    Machine,
    PlanReport,
    recommended_config,
    render_html,
    totals,
    write_report,
)
from slimserve.loadtests.planner import (
    PlanError,
    SweepPoint,
    SweepSettings,
    VariantCapacity,
    capacity_from_sweep,
    check_validation,
    find_knee,
    find_slo_rate,
    plan_variant,
)
from slimserve.loadtests.queueing import replicas_for_slo
from slimserve.serve.config import parse_config

SLO_1S = SLO(ttft_seconds=1.0, itl_seconds=0.1, quantile=0.95)


def _record(variant: str = "full", ttft: float = 0.1, itl: float = 0.02, **extra) -> dict:
    return {
        "status": 200,
        "variant": variant,
        "ttft_seconds": ttft,
        "itl_seconds": itl,
        "e2e_seconds": ttft + 15 * itl,
        "output_tokens": 16,
        **extra,
    }


def _point(kind: str, load: float, rate: float, meets: bool | None = None) -> SweepPoint:
    """A run with `rate` completed requests/s over 10 s; attainment 1.0 when it meets, else 0.5."""
    count = max(1, round(rate * 10))
    ttft = 0.1 if meets in (True, None) else 2.0
    summary = summarize([_record(ttft=ttft) for _ in range(count)], 10.0, SLO_1S)
    return SweepPoint(kind=kind, load=load, summary=summary)


class Synthetic:
    """A server whose throughput saturates at `peak` req/s and that meets the SLO up to
    `slo_rate` arrivals/s; it records the loads it was asked for."""

    def __init__(self, peak: float, slo_rate: float) -> None:
        self.peak, self.slo_rate = peak, slo_rate
        self.asked: list[tuple[str, float]] = []

    def __call__(self, kind: str, load: float) -> SweepPoint:
        self.asked.append((kind, load))
        if kind == "concurrency":
            return _point(kind, load, min(load, self.peak))
        return _point(kind, load, min(load, self.peak), meets=load <= self.slo_rate)


def test_the_knee_is_the_last_doubling_that_still_paid():
    server = Synthetic(peak=5.0, slo_rate=3.3)
    points, knee = find_knee(server, SweepSettings(max_concurrency=64))
    # 1, 2, 4 streams: throughput doubles; 8: 5 req/s (+25%); 16: 5 req/s (+0%): knee at 8.
    assert [p.load for p in points] == [1, 2, 4, 8, 16]
    assert knee.load == 8


def test_without_a_knee_the_sweep_stops_at_its_bound_with_the_best_point():
    server = Synthetic(peak=1000.0, slo_rate=1.0)
    points, knee = find_knee(server, SweepSettings(max_concurrency=8))
    assert [p.load for p in points] == [1, 2, 4, 8]
    assert knee.load == 8


def test_the_slo_rate_is_found_by_doubling_then_bisecting():
    server = Synthetic(peak=10.0, slo_rate=3.3)
    points, best = find_slo_rate(server, 1.0, SweepSettings(bisect_steps=3))
    assert [p.load for p in points] == [1.0, 2.0, 4.0, 3.0, 3.5, 3.25]
    assert best is not None and best.load == 3.25


def test_a_failing_start_halves_down_then_bisects():
    server = Synthetic(peak=10.0, slo_rate=0.3)
    points, best = find_slo_rate(server, 1.0, SweepSettings(bisect_steps=2))
    assert [p.load for p in points] == [1.0, 0.5, 0.25, 0.375, 0.3125]
    assert best is not None and best.load == 0.25


def test_a_variant_that_never_meets_the_slo_has_no_rate():
    server = Synthetic(peak=10.0, slo_rate=0.001)
    _, best = find_slo_rate(server, 1.0, SweepSettings(min_rate=0.1))
    assert best is None


def _capacity(slo_rate: float | None = 1.6, unloaded: float = 0.2) -> VariantCapacity:
    return VariantCapacity(
        variant="full",
        knee_concurrency=8,
        knee_request_rate=2.0,
        knee_output_tokens_per_second=128.0,
        slo_request_rate=slo_rate,
        unloaded_ttft_seconds=unloaded,
        mean_output_tokens=64.0,
        replica_cpus=1.0,
        replica_memory_bytes=500 * 2**20,
        points=[],
    )


def test_the_recommendation_takes_the_larger_of_queueing_and_measurement():
    plan = plan_variant(_capacity(), 1.0, 3.0, SLO_1S, headroom=0.2, dollars_per_replica_hour=2.0)
    queueing = replicas_for_slo(3.0, 2.0, 8, 0.8, quantile=0.95, headroom=0.2)
    assert plan.replicas_by_queueing == queueing.replicas
    assert plan.replicas_by_measurement == math.ceil(3.0 / (1.6 * 0.8)) == 3
    assert plan.replicas == max(queueing.replicas, 3)
    assert plan.cpus == plan.replicas * 1.0
    assert plan.memory_bytes == plan.replicas * 500 * 2**20
    assert plan.max_ongoing_requests == 8
    assert plan.dollars_per_hour == pytest.approx(plan.replicas * 2.0)
    per_hour_tokens = 3.0 * 64 * 3600
    assert plan.dollars_per_million_output_tokens == pytest.approx(
        plan.replicas * 2.0 / per_hour_tokens * 1e6
    )


def test_a_share_of_the_target_is_planned_for():
    plan = plan_variant(_capacity(), 0.25, 4.0, SLO_1S, headroom=0.0, dollars_per_replica_hour=1)
    assert plan.request_rate == 1.0
    assert plan.replicas_by_measurement == 1


def test_impossible_plans_say_why():
    with pytest.raises(PlanError, match="met the SLO at no rate"):
        plan_variant(_capacity(slo_rate=None), 1.0, 1.0, SLO_1S, 0.2, 1.0)
    with pytest.raises(PlanError, match="unloaded TTFT"):
        plan_variant(_capacity(unloaded=1.5), 1.0, 1.0, SLO_1S, 0.2, 1.0)


def test_capacity_reads_the_sweep():
    knee_points = [_point("concurrency", 1, 1.0), _point("concurrency", 2, 2.0)]
    capacity = capacity_from_sweep("full", knee_points, knee_points[1], [], None, 1.0, None)
    assert capacity.knee_concurrency == 2
    assert capacity.knee_request_rate == pytest.approx(2.0)
    assert capacity.unloaded_ttft_seconds == pytest.approx(0.1)
    assert capacity.slo_request_rate is None


def test_attainment_counts_failures_and_slow_requests():
    records = [_record() for _ in range(18)] + [
        _record(ttft=1.5),
        {"status": 503, "error": "overloaded", "e2e_seconds": 0.01},
    ]
    summary = summarize(records, 10.0, SLO_1S)
    assert summary.requests == 20 and summary.succeeded == 19
    assert summary.errors == {"overloaded": 1}
    assert summary.attainment.fraction == pytest.approx(0.9)
    assert not summary.attainment.met
    assert summary.attainment.low < 0.9 < summary.attainment.high


def _served(counts: dict[str, int], slow: str | None = None) -> list[dict]:
    return [
        _record(variant=name, ttft=2.0 if name == slow else 0.1)
        for name, count in counts.items()
        for _ in range(count)
    ]


def test_validation_holds_when_slos_and_split_hold():
    result = check_validation(
        _served({"full": 72, "int8": 28}), {"full": 70, "int8": 30}, SLO_1S, 5, 20, 2.0, 2
    )
    assert result.split_held and result.split_p_value > 0.5
    assert result.held
    assert [c.variant for c in result.variants] == ["full", "int8"]
    assert result.variants[0].ttft_margin_seconds == pytest.approx(0.9)


def test_validation_fails_on_a_skewed_split_or_a_slow_variant():
    skewed = check_validation(
        _served({"full": 95, "int8": 5}), {"full": 70, "int8": 30}, SLO_1S, 5, 20, 2.0, 2
    )
    assert not skewed.split_held and skewed.split_p_value < 1e-6 and not skewed.held
    slow = check_validation(
        _served({"full": 70, "int8": 30}, slow="int8"),
        {"full": 70, "int8": 30},
        SLO_1S,
        5,
        20,
        2.0,
        2,
    )
    assert slow.split_held and not slow.held
    assert [c.held for c in slow.variants] == [True, False]
    assert slow.variants[1].ttft_margin_seconds == pytest.approx(-1.0)


def _report(tmp_path) -> tuple[PlanReport, dict]:
    source = {
        "model": str(tmp_path),
        "variants": {"full": {}, "int8": {"compression": [{"method": "int8-weight-only"}]}},
        "routing": {"split": {"full": 50, "int8": 50}},
    }
    capacities = {"full": _capacity(), "int8": _capacity().model_copy(update={"variant": "int8"})}
    capacities["full"].points = [_point("concurrency", 8, 2.0), _point("rate", 1.6, 1.6, True)]
    capacities["int8"].points = [_point("concurrency", 8, 2.0), _point("rate", 1.6, 1.6, True)]
    plans = [
        plan_variant(capacities["full"], 0.7, 3.0, SLO_1S, 0.2, 1.0),
        plan_variant(capacities["int8"], 0.3, 3.0, SLO_1S, 0.2, 1.0),
    ]
    report = PlanReport(
        created="2026-01-01T00:00:00+00:00",
        machine=Machine(cpu="test cpu", isa="avx2", cores=2),
        config="config.yaml",
        public_model="tiny",
        slo=SLO_1S,
        target_rate=3.0,
        split={"full": 0.7, "int8": 0.3},
        headroom=0.2,
        dollars_per_replica_hour=1.0,
        load=LoadShape(endpoint="chat", max_tokens=64, prompt_words=48, run_seconds=10),
        capacities=capacities,
        plans=plans,
        totals=totals(plans, 3.0, 64.0),
    )
    return report, source


def test_the_recommended_config_is_a_valid_config_with_the_plan(tmp_path):
    report, source = _report(tmp_path)
    config = parse_config(recommended_config(source, report))
    for plan in report.plans:
        deployment = config.deployment_for(plan.variant)
        assert deployment.replicas == plan.replicas
        assert deployment.max_ongoing_requests == 8
    assert config.routing.split == {"full": 70.0, "int8": 30.0}
    assert report.totals.replicas == sum(p.replicas for p in report.plans)


def test_a_plan_writes_json_html_and_both_configs(tmp_path):
    report, source = _report(tmp_path)
    report.validation = check_validation(
        _served({"full": 70, "int8": 30}), report.split, SLO_1S, 3.0, 33, 2.0, 2
    )
    files = write_report(report, tmp_path / "plan", source, {"full": _served({"full": 20})})
    assert PlanReport.model_validate_json(files["report"].read_text()) == report
    html = files["html"].read_text()
    assert html.count("<svg") == 2 and "every SLO held" in html and "int8" in html
    assert "Under-provisioned" not in html
    serve = yaml.safe_load(files["serve"].read_text())
    assert serve["applications"][0]["args"]["config"] == str(files["config"].resolve())
    assert parse_config(yaml.safe_load(files["config"].read_text())).routing.split["full"] == 70


def test_compare_shows_both_plans_and_the_change(tmp_path):
    before, _ = _report(tmp_path)
    after = before.model_copy(deep=True)
    after.totals.dollars_per_hour = before.totals.dollars_per_hour / 2
    table = compare_table(before, after, "before.json", "after.json")
    assert "before.json" in table and "after.json" in table
    hourly = next(line for line in table.splitlines() if line.startswith("$/hour"))
    assert hourly.rstrip().endswith("-50%")


def test_render_without_runs_still_has_the_sweep_plot(tmp_path):
    report, _ = _report(tmp_path)
    assert render_html(report, {}).count("<svg") == 1


def test_run_summary_round_trips():
    summary = summarize([_record()], 1.0)
    assert RunSummary.model_validate_json(summary.model_dump_json()) == summary


def test_a_plan_bigger_than_the_machine_says_so(tmp_path):
    report, _ = _report(tmp_path)
    report.validation = check_validation(
        _served({"full": 70, "int8": 30}), report.split, SLO_1S, 3.0, 33, 8.0, 2
    )
    assert "Under-provisioned: the plan needs\n8.0 CPUs" in render_html(report, {})
