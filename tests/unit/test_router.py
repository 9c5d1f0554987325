import random
from collections import Counter

import pytest

from slimserve.serve.routing.router import UnknownModelError, VariantRouter


def _router(split=None, sticky="x-user-id", seed=1):
    return VariantRouter(
        "base", ["full", "int8"], split or {"full": 0.7, "int8": 0.3}, sticky, random.Random(seed)
    )


def test_pinned_by_variant_or_qualified_name():
    router = _router()
    for _ in range(50):
        assert router.choose("int8", {}) == "int8"
        assert router.choose("base:full", {}) == "full"


def test_unknown_model_raises():
    with pytest.raises(UnknownModelError):
        _router().choose("base:nope", {})
    with pytest.raises(UnknownModelError):
        _router().choose("gpt-4", {})


def test_weighted_split_proportions():
    router = _router()
    counts = Counter(router.choose("base", {}) for _ in range(20000))
    assert abs(counts["int8"] / 20000 - 0.3) < 0.02


def test_sticky_key_is_stable_and_spreads():
    router = _router(split={"full": 0.5, "int8": 0.5})
    for user in ("alice", "bob", "carol"):
        first = router.choose("base", {"x-user-id": user})
        assert all(router.choose("base", {"x-user-id": user}) == first for _ in range(20))
    spread = Counter(router.choose("base", {"x-user-id": f"user-{i}"}) for i in range(2000))
    assert 0.4 < spread["int8"] / 2000 < 0.6


def test_zero_weight_variant_never_chosen_and_bad_split_rejected():
    router = _router(split={"full": 1.0, "int8": 0.0})
    assert {router.choose("base", {}) for _ in range(500)} == {"full"}
    assert router.split == {"full": 1.0}
    with pytest.raises(ValueError):
        router.set_split({"other": 1.0})


def test_down_variants_are_left_out_and_the_rest_reweighted():
    router = VariantRouter(
        "base",
        ["full", "int8", "w4"],
        {"full": 0.5, "int8": 0.3, "w4": 0.2},
        None,
        random.Random(3),
    )
    counts = Counter(router.choose("base", {}, frozenset({"full"})) for _ in range(20000))
    assert set(counts) == {"int8", "w4"}
    assert abs(counts["int8"] / 20000 - 0.6) < 0.02
    # A pinned request goes where it asked, down or not (the gateway answers it 503).
    assert router.choose("base:full", {}, frozenset({"full"})) == "full"


def test_with_every_split_variant_down_a_spare_serves_and_with_none_up_nobody():
    from slimserve.serve.routing.router import NoVariantUpError

    router = _router(split={"full": 1.0, "int8": 0.0})
    assert router.choose("base", {}, frozenset({"full"})) == "int8"
    with pytest.raises(NoVariantUpError):
        router.choose("base", {}, frozenset({"full", "int8"}))


def test_sticky_callers_keep_their_variant_while_another_is_down():
    router = VariantRouter(
        "base", ["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, "x-user-id", random.Random(0)
    )
    users = [f"user-{i}" for i in range(300)]
    before = {u: router.choose("base", {"x-user-id": u}) for u in users}
    after = {u: router.choose("base", {"x-user-id": u}, frozenset({"c"})) for u in users}
    assert all(after[u] != "c" for u in users)
    assert all(after[u] == before[u] for u in users if before[u] != "c")
    displaced = Counter(after[u] for u in users if before[u] == "c")
    assert set(displaced) == {"a", "b"}  # spread over both, not all onto one
