"""Shadow copies: scored comparisons, never visible to the caller, bounded and counted."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from slimserve.serve.config import ShadowRule
from slimserve.serve.routing.shadow_scores import compare, summarize

from .online_helpers import CHAT, chat, online_config, online_gateway, scrape, value

RULE = ShadowRule(source="full", target="int8", fraction=1.0)


def _score(ids: list[int], prompt_tokens: int, logits: torch.Tensor) -> dict:
    logprobs = torch.log_softmax(logits.float(), dim=-1)[: len(ids) - 1]
    return {"token_ids": ids, "prompt_tokens": prompt_tokens, "logprobs": logprobs.numpy()}


def test_identical_distributions_agree_fully_with_zero_kl():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    side = _score([1, 2, 3, 4, 5, 6], 3, logits)
    scores = compare("same", "same", side, side)
    assert scores.exact_match and scores.token_agreement == 1.0
    assert scores.next_token_kl_nats == pytest.approx(0.0, abs=1e-6)
    assert scores.source_reference_perplexity == scores.target_reference_perplexity


def test_kl_and_agreement_of_different_distributions():
    torch.manual_seed(1)
    ids = [1, 2, 3, 4, 5, 6]
    source_logits = torch.randn(6, 50)
    target_logits = -source_logits  # the target's favourite is the source's least likely token
    scores = compare("a", "b", _score(ids, 3, source_logits), _score(ids, 3, target_logits))
    assert not scores.exact_match
    assert scores.token_agreement == 0.0
    p = torch.softmax(source_logits[:5], -1)
    expected = (p * (p.log() - torch.log_softmax(target_logits[:5], -1))).sum(-1).mean()
    assert scores.next_token_kl_nats == pytest.approx(float(expected), rel=1e-2)  # float16 rows


def test_missing_or_mismatched_scores_leave_kl_unavailable():
    side = _score([1, 2, 3], 1, torch.randn(3, 10))
    other = {**side, "token_ids": [1, 2, 4]}
    assert compare("x", "x", side, None).next_token_kl_nats is None
    assert compare("x", "y", side, other).token_agreement is None
    summary = summarize([compare("x", "x", side, None), compare("x", "y", side, side)])
    assert summary.comparisons == 2 and summary.scored == 1 and summary.exact_match == 0.5


@pytest.fixture(scope="module")
def gateway(tiny_model_dir):
    config = online_config(
        tiny_model_dir,
        routing={"split": {"full": 1}, "shadow": [RULE.model_dump()]},
        shadow={"max_concurrency": 1},
    )
    with online_gateway(config) as pair:
        yield pair


def _wait_for_shadows(core, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while core.shadow.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core.shadow.in_flight == 0


def _counts(client) -> dict[str, float]:
    families = scrape(client)
    return {
        outcome: value(
            families,
            "slimserve_shadow_requests",
            "_total",
            source="full",
            target="int8",
            outcome=outcome,
        )
        for outcome in ("shadowed", "dropped", "failed")
    }


def _content(response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def _stream_text(client, body) -> str:
    with client.stream("POST", CHAT, json={**body, "stream": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_shadow_never_changes_what_the_caller_gets_and_is_counted(gateway):
    client, core = gateway
    body = chat("tiny:full", "Tell me about shadows", max_tokens=12, temperature=0, ignore_eos=True)
    before = _counts(client)
    shadowed = client.post(CHAT, json=body)
    _wait_for_shadows(core)  # one copy at a time: the next would be dropped
    streamed = _stream_text(client, body)
    _wait_for_shadows(core)
    after = _counts(client)
    assert after["shadowed"] == before["shadowed"] + 2
    assert after["failed"] == before["failed"]

    core.apply_routing(shadow=[])  # the same requests with no shadow copies
    try:
        plain = client.post(CHAT, json=body)
        plain_stream = _stream_text(client, body)
        assert _counts(client) == after
    finally:
        core.apply_routing(shadow=[RULE])
    assert shadowed.status_code == plain.status_code == 200
    assert shadowed.headers["x-slimserve-variant"] == plain.headers["x-slimserve-variant"] == "full"
    strip = lambda b: {k: v for k, v in b.items() if k not in ("id", "created")}  # noqa: E731
    assert strip(shadowed.json()) == strip(plain.json())
    assert streamed == plain_stream == _content(plain)


def test_shadow_scores_are_exported_per_pair(gateway):
    client, core = gateway
    for i in range(2):
        client.post(CHAT, json=chat("tiny:full", f"Question {i}", max_tokens=6, temperature=0))
        _wait_for_shadows(core)
    families = scrape(client)
    pair = {"source": "full", "target": "int8"}
    agreement = value(families, "slimserve_shadow_token_agreement_ratio", **pair)
    kl = value(families, "slimserve_shadow_next_token_kl_nats", **pair)
    exact = value(families, "slimserve_shadow_exact_match_ratio", **pair)
    ppl = value(families, "slimserve_shadow_reference_perplexity", scored_by="target", **pair)
    assert 0.0 <= agreement <= 1.0 and 0.0 <= exact <= 1.0
    assert 0.0 <= kl < 0.1  # int8 weights: nearly the same distributions
    assert ppl > 1.0
    assert value(families, "slimserve_shadow_window_comparisons", **pair) >= 2
    summary = client.get("/v1/variants").json()["shadow"]["full->int8"]
    assert summary["scored"] == summary["comparisons"] >= 2


def test_shadow_copies_beyond_the_limit_are_dropped_and_counted(gateway):
    client, core = gateway
    before = _counts(client)
    body = chat("tiny:full", "Burst", max_tokens=8, temperature=0, ignore_eos=True)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: client.post(CHAT, json=body).status_code, range(4)))
    _wait_for_shadows(core)
    after = _counts(client)
    assert statuses == [200] * 4
    shadowed = after["shadowed"] - before["shadowed"]
    dropped = after["dropped"] - before["dropped"]
    assert shadowed + dropped == 4 and shadowed >= 1 and dropped >= 1
    assert after["failed"] == before["failed"]


def test_requests_of_other_variants_are_not_shadowed(gateway):
    client, core = gateway
    before = _counts(client)
    assert client.post(CHAT, json=chat("tiny:int8", max_tokens=3)).status_code == 200
    _wait_for_shadows(core)
    assert _counts(client) == before


def test_float16_rows_keep_kl_accurate():
    torch.manual_seed(2)
    a, b = torch.randn(8, 49152) * 3, torch.randn(8, 49152) * 3
    ids = list(range(9))
    exact = compare("", "", _score(ids, 4, a), _score(ids, 4, b)).next_token_kl_nats
    la, lb = torch.log_softmax(a[:8].double(), -1), torch.log_softmax(b[:8].double(), -1)
    reference = float((la.exp() * (la - lb)).sum(-1).mean())
    assert exact == pytest.approx(reference, rel=1e-2)
    assert np.isfinite(exact)
