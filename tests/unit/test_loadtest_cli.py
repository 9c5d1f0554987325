"""The load tests as their users run them, each in a process of its own (locust patches its
process for gevent): locust itself on loadtests/locustfile.py, `slimserve loadtest` and
`slimserve plan`, against the real app over real HTTP on the tiny model, split 75/25 between
full and int8. What they record matches what the server counted, per variant.

No verdict here depends on this machine's speed: the tests check what was sent and recorded, the
split (chi-square), and that a plan's files and validation agree with each other, not whether a
latency SLO held.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import chisquare

from slimserve.loadtests.plan_report import PlanReport
from slimserve.serve.api.backends import InProcessBackend
from slimserve.serve.api.gateway import GatewayCore
from slimserve.serve.config import parse_config

from .online_helpers import online_config, serving, until, variant_servers

pytestmark = pytest.mark.xdist_group("ray")  # starts Ray: see tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SLIMSERVE = str(BIN / "slimserve")
SPLIT = {"full": 75, "int8": 25}


@pytest.fixture(scope="module")
def gateway(tiny_model_dir):
    config = online_config(tiny_model_dir, routing={"split": SPLIT}, self_bench={"enabled": False})
    as_dict = config.model_dump(mode="json")
    servers = variant_servers(config)
    core = GatewayCore(config, {n: InProcessBackend(s) for n, s in servers.items()})
    try:
        with serving(core) as base:
            yield base, as_dict
    finally:
        for server in servers.values():
            server.engine.shutdown()


def _slimserve(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SLIMSERVE, *arguments], capture_output=True, text=True, timeout=timeout, check=False
    )


def _server_counts(base: str) -> dict[str, dict[str, float]]:
    """Answered requests and generated tokens per variant, from the server's /metrics."""
    counts = {name: {"requests": 0.0, "tokens": 0.0} for name in SPLIT}
    text = httpx.get(f"{base}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            variant = sample.labels.get("variant")
            if sample.name == "slimserve_requests_total" and sample.labels["status"] == "200":
                counts[variant]["requests"] += sample.value
            elif sample.name == "slimserve_generation_tokens_total":
                counts[variant]["tokens"] += sample.value
    return counts


def _matches_the_server(rows: list[dict], before: dict, after: dict) -> None:
    for variant in SPLIT:
        mine = [row for row in rows if row["variant"] == variant]
        assert mine, f"no request recorded for {variant}"
        assert len(mine) == after[variant]["requests"] - before[variant]["requests"]
        tokens = after[variant]["tokens"] - before[variant]["tokens"]
        assert sum(row["output_tokens"] for row in mine) == tokens


def test_locust_itself_runs_the_users_and_records_what_the_server_counted(gateway, tmp_path):
    base, _ = gateway
    records = tmp_path / "records.jsonl"
    before = _server_counts(base)
    subprocess.run(
        [
            str(BIN / "locust"),
            "-f",
            str(ROOT / "loadtests/locustfile.py"),
            "--headless",
            "--users=4",
            "--spawn-rate=4",
            "--run-time=3s",
            "--stop-timeout=60",  # users finish the request they are in: nothing cut short
            "--only-summary",
            f"--host={base}",
            f"--records={records}",
            "--model=tiny",
            "--max-tokens=8",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) > 8 and all(row["status"] == 200 for row in rows)
    assert all(row["ttft_seconds"] <= row["e2e_seconds"] for row in rows)
    assert all(row["output_tokens"] == 8 for row in rows)
    _matches_the_server(rows, before, _server_counts(base))


def test_open_loop_run_records_every_request_and_the_configured_split(gateway, tmp_path):
    base, _ = gateway
    before = _server_counts(base)
    records = tmp_path / "records.jsonl"
    done = _slimserve(
        "loadtest",
        f"--url={base}",
        "--model=tiny",
        "--rate=40",
        "--requests=120",
        "--users=64",
        "--max-tokens=4",
        "--seconds=120",
        f"--records={records}",
        "--slo",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 120 and all(row["status"] == 200 for row in rows)
    assert all(row["output_tokens"] == 4 for row in rows)  # ignore_eos: exactly max_tokens
    # Latencies count from the scheduled arrival, so they include any wait for a free user.
    assert all(row["ttft_seconds"] >= row["client_wait_seconds"] for row in rows)
    served = {name: sum(row["variant"] == name for row in rows) for name in SPLIT}
    assert sum(served.values()) == 120
    expected = [120 * weight / 100 for weight in SPLIT.values()]
    # The bound: a router splitting 50/50 instead gives p ~ 1e-7 with 120 requests.
    assert chisquare(list(served.values()), expected).pvalue > 0.001
    _matches_the_server(rows, before, _server_counts(base))
    summary = json.loads(Path(f"{records}.summary.json").read_text())
    assert summary["requests"] == 120 and summary["variants"] == served
    assert "SLO attainment" in done.stdout and "TTFT ms p50 / p95 / p99" in done.stdout


def test_a_trace_is_replayed_request_by_request(gateway, tmp_path):
    base, _ = gateway
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"prompt": "The lighthouse keeper", "max_tokens": 3},
        {"prompt": "A short history of", "max_tokens": 5},
        {"prompt": "Once upon a time", "max_tokens": 7},
    ]
    trace.write_text("\n".join(json.dumps(line) for line in lines))
    records = tmp_path / "records.jsonl"
    done = _slimserve(
        "loadtest",
        f"--url={base}",
        "--model=tiny:int8",
        "--endpoint=completions",
        f"--trace={trace}",
        "--requests=6",
        "--users=2",
        f"--records={records}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(row["output_tokens"] for row in rows) == [3, 3, 5, 5, 7, 7]
    assert {row["variant"] for row in rows} == {"int8"}  # pinned by model name


def test_ctrl_c_stops_a_run_and_still_writes_what_was_measured(gateway, tmp_path):
    base, _ = gateway
    records = tmp_path / "records.jsonl"
    run = subprocess.Popen(
        [
            *(SLIMSERVE, "loadtest", f"--url={base}", "--model=tiny", "--users=2"),
            *("--seconds=300", "--max-tokens=4", f"--records={records}"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    until(
        lambda: records.exists() and len(records.read_text().splitlines()) >= 5,
        "five finished requests",
        limit=120,
    )
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-3000:]
    rows = records.read_text().splitlines()
    summary = json.loads(Path(f"{records}.summary.json").read_text())
    assert summary["interrupted"] and summary["requests"] == len(rows) >= 5
    assert "interrupted" in stdout


def test_plan_sweeps_recommends_and_validates_a_deployment(gateway, tmp_path):
    base, as_dict = gateway
    source = {
        key: as_dict[key] for key in ("model", "served_model_name", "variants", "routing", "engine")
    }
    source["self_bench"] = {"enabled": False}
    source["mfu"] = {"benchmark_seconds": 0.1}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(source))
    out = tmp_path / "plan"
    done = _slimserve(
        "plan",
        str(config_path),
        f"--url={base}",
        "--target-rate=4",
        "--max-concurrency=1",
        "--run-seconds=1",
        "--bisect-steps=0",
        "--min-requests=8",
        "--max-tokens=4",
        "--slo-ttft=0.25",
        "--slo-itl=0.5",
        "--validate",
        "--validate-seconds=4",
        f"--out={out}",
        timeout=600,
    )
    assert done.returncode in (0, 1) and (out / "report.json").exists(), done.stderr[-5000:]
    report = PlanReport.model_validate_json((out / "report.json").read_text())
    assert set(report.capacities) == {"full", "int8"}
    for capacity in report.capacities.values():
        kinds = {point.kind for point in capacity.points}
        assert kinds == {"concurrency", "rate"}
        for point in capacity.points:
            assert (out / point.records_file).exists()
    assert report.split == {"full": 0.75, "int8": 0.25}
    deployed = parse_config(yaml.safe_load((out / "slimserve-config.yaml").read_text()))
    for plan in report.plans:
        assert plan.replicas >= 1
        assert deployed.deployment_for(plan.variant).replicas == plan.replicas
    serve = yaml.safe_load((out / "serve-config.yaml").read_text())
    assert serve["applications"][0]["import_path"] == "slimserve.serve.app:app_builder"
    # The validation ran against the deployed plan through the public name: every request it
    # sent was answered by a variant of the plan, and its verdict is the exit status.
    validation = report.validation
    assert validation is not None, done.stderr[-5000:]  # why the validation run failed
    assert validation.requests == 16
    answered = sum(check.requests for check in validation.variants)
    assert answered <= validation.requests <= answered + sum(validation.errors.values())
    assert done.returncode == (0 if validation.held else 1)
    assert validation.split_p_value is not None
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 2 and "Validation" in html
