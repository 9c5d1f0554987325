"""The admin API: bearer auth in OpenAI's error shape, live reweighting, canary control."""

from __future__ import annotations

from collections import Counter

import pytest
from fastapi.testclient import TestClient

from slimserve.serve.api.gateway import GatewayCore, create_api
from slimserve.serve.config import RoutingConfig

from .online_helpers import CHAT, chat, online_config, online_gateway, scrape, value

TOKEN = "s3cret-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def gateway(tiny_model_dir):
    config = online_config(
        tiny_model_dir,
        admin={"token": TOKEN},
        canary={"slo": {"min_samples": 2, "min_shadow_samples": 1}},
    )
    with online_gateway(config) as pair:
        yield pair


def _served_by(client, n: int = 24) -> Counter:
    variants = Counter()
    for _ in range(n):
        response = client.post(CHAT, json=chat(max_tokens=1))
        assert response.status_code == 200
        variants[response.headers["x-slimserve-variant"]] += 1
    return variants


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_token"),
        ({"authorization": "Bearer wrong"}, 403, "invalid_token"),
        ({"authorization": f"Basic {TOKEN}"}, 403, "invalid_token"),
        ({"authorization": f"Bearer {TOKEN}x"}, 403, "invalid_token"),
    ],
)
def test_admin_needs_the_right_bearer_token(gateway, headers, status, code):
    client, _ = gateway
    for method, path in (("GET", "/admin/routing"), ("PUT", "/admin/routing")):
        response = client.request(method, path, headers=headers, json={"split": {"full": 1}})
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert client.get("/admin/routing", headers=AUTH).status_code == 200
    # the public API never asks for the token
    assert client.post(CHAT, json=chat(max_tokens=1)).status_code == 200


def test_live_reweighting_changes_routing(gateway):
    client, core = gateway
    try:
        response = client.put(
            "/admin/routing", headers=AUTH, json={"split": {"full": 0, "int8": 3}}
        )
        assert response.status_code == 200
        assert response.json()["split"] == {"int8": 1.0}
        assert _served_by(client) == Counter({"int8": 24})
        assert value(scrape(client), "slimserve_routing_weight_ratio", variant="full") == 0.0
        client.put("/admin/routing", headers=AUTH, json={"split": {"full": 1}})
        assert _served_by(client) == Counter({"full": 24})
    finally:
        core.apply_routing(split={"full": 1, "int8": 1})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"split": {"nope": 1}}, "split"),
        ({"split": {"full": 0}}, "split"),
        ({"split": {"full": "lots"}}, "split.full"),
        ({"shadow": {"source": "full", "target": "nope"}}, "shadow"),
        ({"weights": {}}, "weights"),
    ],
)
def test_bad_routing_updates_are_refused_and_change_nothing(gateway, body, param):
    client, core = gateway
    before = core.router.split
    response = client.put("/admin/routing", headers=AUTH, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert core.router.split == before


def test_shadow_rules_change_live(gateway):
    client, core = gateway
    rule = {"source": "full", "target": "int8", "fraction": 0.5}
    response = client.put("/admin/routing", headers=AUTH, json={"shadow": rule})
    assert response.json()["shadow"] == [rule]
    assert [r.fraction for r in core.shadow.rules] == [0.5]
    client.put("/admin/routing", headers=AUTH, json={"shadow": []})
    assert core.shadow.rules == []


def test_canary_auto_toggle_and_evaluation(gateway):
    client, core = gateway
    response = client.put("/admin/canary", headers=AUTH, json={"enabled": True})
    assert response.json()["canary_auto"] is True
    assert core.router.split == pytest.approx({"int8": 0.1, "full": 0.9})
    evaluated = client.post("/admin/canary/evaluate", headers=AUTH).json()
    # no shadow rule full -> int8: the quality checks cannot pass, so it holds
    assert evaluated["decisions"]["int8"]["action"] == "hold"
    report = client.get("/v1/canary").json()
    assert report["auto"] is True and report["variants"]["int8"]["canary"]["percent"] == 10
    # a split set by hand stops the canary from overriding it
    client.put("/admin/routing", headers=AUTH, json={"split": {"full": 1, "int8": 1}})
    assert client.get("/admin/routing", headers=AUTH).json()["canary_auto"] is False
    assert client.get("/metrics").text.count("slimserve_canary_auto_enabled 0.0") == 1


def test_the_routing_section_applies_only_what_changed(gateway):
    _, core = gateway
    previous = RoutingConfig(split={"full": 1, "int8": 1})
    core.canary.set_auto(True)
    core.apply_routing_section(RoutingConfig(split={"full": 1, "int8": 1}, shadow=[]), previous)
    assert core.canary.auto  # same split: the canary keeps its own
    core.apply_routing_section(RoutingConfig(split={"full": 1, "int8": 4}), previous)
    assert not core.canary.auto and core.router.split == pytest.approx({"full": 0.2, "int8": 0.8})
    core.apply_routing(split={"full": 1, "int8": 1})


def test_token_from_the_env_and_a_disabled_admin_api(gateway, monkeypatch):
    _, core = gateway
    config = core.config.model_copy(
        update={"admin": core.config.admin.model_copy(update={"token": None})}
    )
    monkeypatch.delenv("SLIMSERVE_ADMIN_TOKEN", raising=False)
    with TestClient(create_api(GatewayCore(config, core.backends))) as client:
        response = client.get("/admin/routing", headers=AUTH)
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"
        assert client.get("/admin/routing").status_code == 401
    monkeypatch.setenv("SLIMSERVE_ADMIN_TOKEN", "from-env")
    with TestClient(create_api(GatewayCore(config, core.backends))) as client:
        assert (
            client.get("/admin/routing", headers={"authorization": "Bearer from-env"}).status_code
            == 200
        )
