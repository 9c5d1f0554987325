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
