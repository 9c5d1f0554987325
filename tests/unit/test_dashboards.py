"""deploy/prometheus and deploy/grafana parse, and every metric the dashboard queries is in a
real /metrics scrape of the in-process gateway (shadow, canary, admin all on)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .online_helpers import CHAT, chat, online_config, online_gateway

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/slimserve-dashboard.json"
METRIC = re.compile(r"\bslimserve_[a-z0-9_]+")


def _exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_prometheus_config_scrapes_the_gateway():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    for path in (ROOT / "deploy/grafana/provisioning").rglob("*.yml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1


def test_dashboard_is_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"type", "title", "gridPos"} <= set(panel)
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["refId"] and target["expr"].count("(") == target["expr"].count(")")


@pytest.fixture(scope="module")
def scraped_names(tiny_model_dir) -> set[str]:
    config = online_config(
        tiny_model_dir,
        routing={
            "split": {"full": 1, "int8": 1},
            "shadow": {"source": "full", "target": "int8", "fraction": 1.0},
        },
        canary={"enabled": True, "interval_seconds": 1, "slo": {"min_samples": 1}},
        admin={"token": "t"},
    )
    with online_gateway(config) as (client, core):
        for i in range(3):
            body = chat("tiny:full" if i % 2 else "tiny:int8", f"Hi {i}", max_tokens=4)
            assert client.post(CHAT, json=body).status_code == 200
        deadline = time.monotonic() + 30
        while core.shadow.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        text = client.get("/metrics").text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_dashboard_metric_is_exported(scraped_names):
    queried = {
        m for expr in _exprs(json.loads(DASHBOARD.read_text())) for m in METRIC.findall(expr)
    }
    assert len(queried) >= 25
    missing = sorted(queried - scraped_names)
    assert not missing, f"the dashboard queries metrics the gateway does not export: {missing}"
