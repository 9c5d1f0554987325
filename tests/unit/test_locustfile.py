"""The locust users, run headless by locust itself against the real app over real HTTP (two
variants on the tiny model, split 50/50): every request they record matches what the server
counted, per variant, and tokens add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from slimserve.serve.api.backends import InProcessBackend
from slimserve.serve.api.gateway import GatewayCore
from slimserve.serve.replica.server import VariantServer

from .online_helpers import online_config, serving

ROOT = Path(__file__).resolve().parents[2]
LOCUST = str(Path(sys.executable).parent / "locust")


def _server_counts(base: str) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, float]] = {}
    text = httpx.get(f"{base}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            variant = sample.labels.get("variant")
            if sample.name == "slimserve_requests_total" and sample.labels["status"] == "200":
                counts.setdefault(variant, {}).setdefault("requests", 0.0)
                counts[variant]["requests"] += sample.value
            elif sample.name == "slimserve_generation_tokens_total":
                counts.setdefault(variant, {})["tokens"] = sample.value
    return counts


def _locust(base: str, records: Path, endpoint: str) -> None:
    subprocess.run(
        [
            LOCUST,
            "-f",
            str(ROOT / "loadtests/locustfile.py"),
            "--headless",
            "--users=4",
            "--spawn-rate=4",
            "--run-time=4s",
            "--stop-timeout=60",  # users finish the request they are in: nothing cut short
            "--only-summary",
            f"--host={base}",
            f"--records={records}",
            "--model=tiny",
            f"--endpoint={endpoint}",
            "--max-tokens=8",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


def test_locust_records_match_the_servers_own_counters(tiny_model_dir, tmp_path):
    config = online_config(tiny_model_dir, self_bench={"enabled": False})
    as_dict = config.model_dump(mode="json")
    servers = {name: VariantServer(name, as_dict) for name in config.variants}
    core = GatewayCore(config, {n: InProcessBackend(s) for n, s in servers.items()})
    try:
        with serving(core) as base:
            for endpoint in ("chat", "completions"):
                _locust(base, tmp_path / f"{endpoint}.jsonl", endpoint)
            counts = _server_counts(base)
    finally:
        for server in servers.values():
            server.engine.shutdown()
    rows = [
        json.loads(line)
        for endpoint in ("chat", "completions")
        for line in (tmp_path / f"{endpoint}.jsonl").read_text().splitlines()
    ]
    assert {row["endpoint"] for row in rows} == {"chat", "completions"}
    assert len(rows) > 8 and all(row["status"] == 200 for row in rows)
    assert all(row["ttft_seconds"] <= row["e2e_seconds"] for row in rows)
    assert all(row["output_tokens"] > 0 for row in rows)
    for variant in ("full", "int8"):
        mine = [row for row in rows if row["variant"] == variant]
        assert mine, f"no request recorded for {variant}"
        assert len(mine) == counts[variant]["requests"]
        assert sum(row["output_tokens"] for row in mine) == counts[variant]["tokens"]
