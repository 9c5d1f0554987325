from slimserve.serve.engine.prefix_cache import MIN_REUSE_TOKENS, PrefixCache, common_prefix


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_lookup_leaves_the_last_prompt_token_to_compute():
    cache = PrefixCache(first_slot=5, slots=1, max_tokens=64)
    prompt = list(range(30))
    kept = cache.slot_to_fill(prompt)
    assert (kept.slot, kept.tokens) == (5, 30)
    hit = cache.lookup(prompt)  # the same prompt again: all but its last token
    assert (hit.slot, hit.tokens) == (5, 29)
    hit = cache.lookup([*range(20), 999, 998])
    assert hit.tokens == 20
    assert cache.lookup([*range(MIN_REUSE_TOKENS - 1), 999]) is None  # too short to bother


def test_covered_prompts_are_not_stored_again_and_the_least_recent_entry_goes():
    cache = PrefixCache(first_slot=0, slots=2, max_tokens=64)
    a, b, c = [1] * 20, [2] * 20, [3] * 20
    slot_a, slot_b = cache.slot_to_fill(a).slot, cache.slot_to_fill(b).slot
    assert {slot_a, slot_b} == {0, 1}
    assert cache.slot_to_fill(a[:12]) is None  # already inside entry a (and a is now recent)
    assert cache.slot_to_fill(c).slot == slot_b  # b was used least recently
    assert cache.lookup(b) is None
    assert cache.lookup(a).slot == slot_a


def test_no_slots_means_no_cache():
    cache = PrefixCache(first_slot=0, slots=0, max_tokens=64)
    assert cache.slot_to_fill(list(range(40))) is None
    assert cache.lookup(list(range(40))) is None


def test_entries_keep_at_most_their_length_of_a_longer_prompt():
    cache = PrefixCache(first_slot=3, slots=1, max_tokens=16)
    long = list(range(100))
    kept = cache.slot_to_fill(long)
    assert (kept.slot, kept.tokens) == (3, 16)  # the first 16 positions go to the store
    assert cache.slot_to_fill([*range(16), 500, 501]) is None  # its first 16 are kept already
    hit = cache.lookup([*range(40), 7])
    assert (hit.slot, hit.tokens) == (3, 16)
