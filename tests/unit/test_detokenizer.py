import pytest

from slimserve.serve.engine.detokenizer import IncrementalDetokenizer


def _stream(tokenizer, text: str, stop: list[str]):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        pieces.append(detok.add(token))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok.stopped


@pytest.mark.parametrize(
    "text", ["Hello world, this is plain.", "naïve café — 東京 🚀🎉 emoji", "a\n\n  b\tc"]
)
def test_stream_reassembles_exactly_and_never_emits_broken_characters(tokenizer, text):
    pieces, stopped = _stream(tokenizer, text, [])
    assert "".join(pieces) == text
    assert not stopped
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_character_split_across_tokens_is_held(tokenizer):
    ids = tokenizer("🚀", add_special_tokens=False).input_ids
    assert len(ids) > 1  # the premise: byte-level BPE splits this emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🚀"


def test_stop_string_across_token_boundaries(tokenizer):
    pieces, stopped = _stream(tokenizer, "The answer is 42. END of story", ["END"])
    assert stopped
    assert "".join(pieces) == "The answer is 42. "


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer):
    pieces, stopped = _stream(tokenizer, "Ending soon, then EN", ["END!"])
    assert not stopped
    assert "".join(pieces) == "Ending soon, then EN"
