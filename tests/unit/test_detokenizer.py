"""The streamed text against a full decode of the same tokens, on the real SmolLM2 tokenizer."""

import random

import pytest

from slimserve.serve.engine.detokenizer import IncrementalDetokenizer

MIXED = [
    "Hello world, this is plain.",
    "naïve café — 東京 🚀🎉 emoji",
    "a\n\n  b\tc",
    "東京タワー",  # every character split over several byte-level tokens
    "Ölçü 👩\u200d👩\u200d👧 stop⛔here",  # a zero-width-joiner emoji sequence
]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _full(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(detok.add(token))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok.stopped


@pytest.mark.parametrize("text", MIXED)
def test_stream_reassembles_exactly_and_never_emits_broken_characters(tokenizer, text):
    pieces, stopped = _stream(tokenizer, _ids(tokenizer, text), [])
    assert "".join(pieces) == text
    assert not stopped
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("text", MIXED)
def test_each_step_sends_the_full_decode_once_its_last_character_is_complete(tokenizer, text):
    """Without stop strings, after every token the text sent so far is the full decode of the
    tokens so far: all of it when that ends in a complete character, else a prefix (the newest
    token's text waits for its character to complete)."""
    ids = _ids(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [])
    sent = ""
    for k, token in enumerate(ids, 1):
        sent += detok.add(token)
        full = _full(tokenizer, ids[:k])
        if full.endswith("\ufffd"):
            assert full.rstrip("\ufffd").startswith(sent)
        else:
            assert sent == full


def test_special_tokens_are_skipped_as_in_a_full_decode(tokenizer):
    ids = _ids(tokenizer, "<|im_start|>assistant\nHi 🚀<|im_end|> there<|endoftext|>")
    assert tokenizer.all_special_ids and set(ids) & set(tokenizer.all_special_ids)
    pieces, _ = _stream(tokenizer, ids, [])
    assert "".join(pieces) == _full(tokenizer, ids) == "assistant\nHi 🚀 there"


def test_random_tokens_match_a_full_decode(tokenizer):
    """Arbitrary token sequences, including invalid UTF-8 a model can sample; what is left
    incomplete at the end comes out of flush as the full decode gives it (U+FFFD)."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        pieces, stopped = _stream(tokenizer, ids, [])
        assert "".join(pieces) == _full(tokenizer, ids)
        assert not stopped
        if "\ufffd" not in _full(tokenizer, ids).rstrip("\ufffd"):  # no invalid bytes mid-text
            assert all("\ufffd" not in piece for piece in pieces[:-1])


def test_multibyte_character_split_across_tokens_is_held(tokenizer):
    ids = _ids(tokenizer, "🚀")
    assert len(ids) > 1  # the premise: byte-level BPE splits this emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🚀"


def test_flush_releases_an_incomplete_character_as_a_full_decode_does(tokenizer):
    ids = _ids(tokenizer, "go 🚀")[:-1]
    detok = IncrementalDetokenizer(tokenizer, [])
    sent = "".join(detok.add(i) for i in ids)
    assert sent == "go"
    assert sent + detok.flush() == _full(tokenizer, ids)


def test_stop_string_across_token_boundaries(tokenizer):
    pieces, stopped = _stream(tokenizer, _ids(tokenizer, "The answer is 42. END of story"), ["END"])
    assert stopped
    assert "".join(pieces) == "The answer is 42. "


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("naïve café — 東京 🚀🎉 emoji", "東京"),  # the stop's characters span several tokens
        ("Ölçü 👩\u200d👩\u200d👧 stop⛔here", "⛔h"),
        ("Ölçü 👩\u200d👩\u200d👧 stop⛔here", "👧 st"),
    ],
)
def test_multibyte_stop_string(tokenizer, text, stop):
    ids = _ids(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [stop])
    sent = ""
    for k, token in enumerate(ids, 1):
        sent += detok.add(token)
        # Stops on the token that completes the stop string, not later.
        assert detok.stopped == (stop in _full(tokenizer, ids[:k]))
        if detok.stopped:
            break
    assert detok.stopped
    assert sent + detok.flush() == text[: text.index(stop)]


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer):
    pieces, stopped = _stream(tokenizer, _ids(tokenizer, "Ending soon, then EN"), ["END!"])
    assert not stopped
    assert "".join(pieces) == "Ending soon, then EN"
    assert pieces[-1] == "EN"  # held back until the end: it could still have become "END!"


def test_a_possible_stop_prefix_is_held_then_released_when_it_diverges(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, ["END!"])
    first, second = _ids(tokenizer, " END"), _ids(tokenizer, " now")
    assert "".join(detok.add(i) for i in first) == " "
    assert "".join(detok.add(i) for i in second) == "END now"
    assert not detok.stopped
