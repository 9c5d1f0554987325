"""Online benchmarking on the real model behind real Ray Serve: live reweighting through Ray
Serve's reconfigure path, then the canary config (full + int8 + a 90%-pruned variant) under
traffic with shadow copies: the canary must roll back the broken variant and promote int8."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from slimserve.serve.ports import free_port
from slimserve.serve.ray_settings import apply_serve_environment

from .conftest import CONFIGS, running_gateway

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

MODEL = "smollm2-135m-instruct"
ADMIN_TOKEN = "integration-admin"
TOPICS = [
    "the capital of France",
    "how rain forms",
    "what a prime number is",
    "why the sky is blue",
    "how to boil an egg",
    "what Python lists are",
    "the largest planet",
    "how bees make honey",
]


# ---- Ray Serve's reconfigure path -------------------------------------------------------------


@contextlib.contextmanager
def _local_serve(port: int) -> Iterator[object]:
    import ray
    from ray import serve

    apply_serve_environment()  # as `slimserve serve` runs Ray Serve
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield serve.context._get_global_client()
    finally:
        serve.shutdown()
        ray.shutdown()


def _deploy(client, config_path: Path, user_config: dict | None = None) -> None:
    """What `serve deploy` sends: an application built by slimserve.serve.app:app_builder."""
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": "slimserve",
        "route_prefix": "/",
        "import_path": "slimserve.serve.app:app_builder",
        "args": {"config": str(config_path)},
    }
    if user_config is not None:
        app["deployments"] = [{"name": "gateway", "user_config": user_config}]
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            result = predicate()
            if result:
                return result
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def _served_by(base: str, n: int) -> Counter:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    return Counter(
        httpx.post(f"{base}/v1/completions", json=body, timeout=60).headers["x-slimserve-variant"]
        for _ in range(n)
    )


def _requests_total(base: str, variant: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "slimserve_requests_total" and s.labels["variant"] == variant
    )


def test_serve_deploy_with_a_new_user_config_reweights_without_restart(tmp_path):
    # Runs first in this module, before the canary gateway below starts.
    config = {
        "model": MODEL,
        "variants": {"a": {}, "b": {}},  # the same checkpoint twice: cheap to load
        "routing": {"split": {"a": 1}},
        "engine": {"max_num_seqs": 4, "max_model_len": 256},
        "deployment": {"num_cpus": 0.5},
        "self_bench": {"enabled": False},
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with _local_serve(port) as client:
        _deploy(client, path)
        _wait_for(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, 300, "app")
        assert httpx.get(f"{base}/v1/variants", timeout=30).json()["split"] == {"a": 1.0}
        assert _served_by(base, 5) == Counter({"a": 5})
        served_before = _requests_total(base, "a")

        _deploy(client, path, user_config={"split": {"a": 0, "b": 1}})

        def reweighted() -> bool:
            return httpx.get(f"{base}/v1/variants", timeout=30).json()["split"] == {"b": 1.0}

        _wait_for(reweighted, 120, "the new user_config")
        assert _served_by(base, 5) == Counter({"b": 5})
        # the same gateway replica: its counters survived (a restart would have reset them)
        assert _requests_total(base, "a") == served_before


# ---- the canary under traffic -----------------------------------------------------------------


@pytest.fixture(scope="module")
def canary_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("canary-gateway") / "serve.log"


def _log_errors(path: Path, limit: int = 40) -> str:
    """The gateway log's error lines, for a failure's message."""
    wanted = ("ERROR", "Traceback", "failed")
    lines = [line for line in path.read_text().splitlines() if any(w in line for w in wanted)]
    return "\n".join(lines[:limit])


@pytest.fixture(scope="module")
def canary_gateway(canary_log: Path) -> Iterator[str]:
    config = yaml.safe_load((CONFIGS / "canary.yaml").read_text())
    config["routing"]["shadow"] = [
        {"source": "full", "target": "int8", "fraction": 1.0},
        {"source": "full", "target": "pruned90", "fraction": 1.0},
    ]
    config["canary"].update(interval_seconds=5, steps=[25, 50, 100])
    config["canary"]["slo"].update(
        max_p95_ttft_seconds=30.0,  # a shared 2-core machine running three variants
        max_error_rate=0.05,
        min_token_agreement=0.7,
        min_samples=3,
        min_shadow_samples=2,
    )
    config["self_bench"] = {"perplexity_windows": 2, "batch_sizes": [1, 4], "decode_tokens": 8}
    config["engine"].update(max_num_seqs=8, max_model_len=512)
    config["admin"] = {"token": ADMIN_TOKEN}
    path = canary_log.parent / "canary.yaml"
    path.write_text(yaml.safe_dump(config))
    with running_gateway(path, canary_log) as base:
        yield base


async def _traffic(
    base: str, stop: asyncio.Event, failures: list[str], concurrency: int = 4
) -> Counter:
    """(variant, status) of each answer; the first few failed answers' bodies in `failures`."""
    counter = itertools.count()
    served: Counter = Counter()

    async def worker(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            topic = TOPICS[next(counter) % len(TOPICS)]
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"In one sentence: {topic}?"}],
                "max_tokens": 12,
                "temperature": 0,
            }
            response = await http.post(f"{base}/v1/chat/completions", json=body)
            variant = response.headers.get("x-slimserve-variant")
            served[(variant, response.status_code)] += 1
            if response.status_code != 200 and len(failures) < 5:
                failures.append(f"{variant} {response.status_code}: {response.text}")

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return served


async def _until_decided(base: str, timeout: float) -> tuple[dict, Counter, list[str]]:
    stop = asyncio.Event()
    failures: list[str] = []
    traffic = asyncio.create_task(_traffic(base, stop, failures))
    deadline = time.monotonic() + timeout
    report: dict = {}
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            while time.monotonic() < deadline:
                await asyncio.sleep(2)
                report = (await http.get(f"{base}/v1/canary")).json()
                states = {
                    n: v["canary"]["status"] for n, v in report["variants"].items() if "canary" in v
                }
                if states == {"int8": "promoted", "pruned90": "rolled_back"}:
                    break
    finally:
        stop.set()
        served = await traffic
    return report, served, failures


@pytest.fixture(scope="module")
def canary_outcome(canary_gateway) -> tuple[dict, Counter, list[str]]:
    return asyncio.run(_until_decided(canary_gateway, timeout=150))


def test_canary_rolls_back_the_broken_variant_and_promotes_int8(
    canary_gateway, canary_outcome, canary_log
):
    report, served, failures = canary_outcome
    variants = report["variants"]
    assert variants["pruned90"]["canary"]["status"] == "rolled_back", variants["pruned90"]
    assert variants["int8"]["canary"]["status"] == "promoted", variants["int8"]
    assert variants["pruned90"]["weight"] == 0.0 and variants["int8"]["weight"] == 1.0
    actions = [(e["variant"], e["action"]) for e in report["events"]]
    assert ("pruned90", "rollback") in actions and actions.count(("int8", "promote")) == 2
    assert {status for (_, status) in served} == {200}, (served, failures, _log_errors(canary_log))
    # after the canary: the public name lands on int8 only
    assert _served_by(canary_gateway, 6) == Counter({"int8": 6})


def test_quality_evidence_separates_the_good_from_the_broken(canary_gateway, canary_outcome):
    report, _, _ = canary_outcome
    variants = report["variants"]
    full_ppl = variants["full"]["quality"]["perplexity"]
    assert 5 < full_ppl < 60
    assert abs(variants["int8"]["quality"]["perplexity_delta"]) < 0.05
    assert variants["pruned90"]["quality"]["perplexity_delta"] > 1.0
    good = variants["int8"]["quality"]["shadow_vs_baseline"]
    assert good["scored"] >= 2 and good["token_agreement"] >= 0.7
    assert good["next_token_kl_nats"] < 0.5
    ttft = variants["int8"]["latency"]["ttft_seconds"]["p50"]
    assert ttft is None or ttft["value"] > 0
    shadow = httpx.get(f"{canary_gateway}/v1/variants", timeout=30).json()["shadow"]
    assert shadow["full->int8"]["comparisons"] >= 2
    if "full->pruned90" in shadow:  # the broken one may have been judged on perplexity alone
        broken = shadow["full->pruned90"]
        assert broken["token_agreement"] < good["token_agreement"]
        assert broken["next_token_kl_nats"] > good["next_token_kl_nats"]


def test_online_metrics_on_the_real_model(canary_gateway, canary_outcome):
    text = httpx.get(f"{canary_gateway}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def by_variant(name: str, **labels: str) -> dict[str, float]:
        return {
            s.labels["variant"]: s.value
            for s in families[name].samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        }

    mfu = by_variant("slimserve_variant_mfu_ratio")
    assert 0 < mfu["int8"] <= 1, mfu  # the promoted variant has served within the window
    assert all(0 <= m <= 1 for m in mfu.values())
    assert all(v > 1e8 for v in by_variant("slimserve_variant_peak_flops_per_second").values())
    assert all(v > 1e8 for v in by_variant("slimserve_variant_resident_memory_bytes").values())
    assert by_variant("slimserve_variant_sparsity_ratio")["pruned90"] > 0.85
    ppl = by_variant("slimserve_variant_self_bench_perplexity")
    assert ppl["pruned90"] > 10 * ppl["full"]
    decode = by_variant("slimserve_variant_self_bench_tokens_per_second", phase="decode", batch="1")
    assert set(decode) == {"full", "int8", "pruned90"} and min(decode.values()) > 0
    shadowed = {
        (s.labels["target"], s.labels["outcome"]): s.value
        for s in families["slimserve_shadow_requests"].samples
        if s.name == "slimserve_shadow_requests_total"
    }
    assert shadowed[("int8", "shadowed")] >= 2
    assert sum(v for (_, outcome), v in shadowed.items() if outcome == "failed") == 0
    queue = {
        s.labels["variant"]: s.value
        for s in families["slimserve_queue_wait_seconds"].samples
        if s.name == "slimserve_queue_wait_seconds_count"
    }
    assert queue["int8"] > 0


def test_admin_api_on_the_real_gateway(canary_gateway, canary_outcome):
    url = f"{canary_gateway}/admin/routing"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer no"}, timeout=30).status_code == 403
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    response = httpx.put(url, headers=auth, json={"split": {"full": 1}}, timeout=30)
    assert response.status_code == 200 and response.json()["split"] == {"full": 1.0}
    assert _served_by(canary_gateway, 4) == Counter({"full": 4})
