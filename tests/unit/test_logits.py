"""Per-sequence logit processing against the formulas it implements, on small hand-made rows."""

from __future__ import annotations

import math

import pytest
import torch

from slimserve.serve.engine.logits import SequenceLogits, logprob_rows, token_logprobs
from slimserve.serve.engine.types import SamplingParams

V = 8
EOS = 7


def _process(params: SamplingParams, row: list[float], prompt=(0,), generated=()) -> list[float]:
    logits = SequenceLogits(params, list(prompt), V, {EOS}, grammar=None)
    for token in generated:
        assert logits.accept(token)
    out = torch.tensor(row, dtype=torch.float32)
    logits.process(out)
    return out.tolist()


ROW = [1.0, -2.0, 0.5, 3.0, 0.0, -1.0, 2.0, 1.5]


def test_frequency_and_presence_penalties_follow_openai():
    # OpenAI: logit - count * frequency - (count > 0) * presence, over generated tokens only.
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = _process(params, ROW, prompt=(4,), generated=(3, 3, 1))
    expected = list(ROW)
    expected[3] -= 2 * 0.5 + 0.25
    expected[1] -= 1 * 0.5 + 0.25
    assert out == pytest.approx(expected)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # CTRL's rule, over prompt and generated tokens alike.
    params = SamplingParams(repetition_penalty=2.0)
    out = _process(params, ROW, prompt=(0, 1), generated=(3,))
    expected = list(ROW)
    expected[0] /= 2.0
    expected[1] *= 2.0
    expected[3] /= 2.0
    assert out == pytest.approx(expected)


def test_logit_bias_is_added_before_the_repetition_penalty():
    params = SamplingParams(logit_bias={2: 1.5, 5: -100.0}, repetition_penalty=2.0)
    out = _process(params, ROW, prompt=(2,))
    assert out[2] == pytest.approx((0.5 + 1.5) / 2.0)
    assert out[5] == pytest.approx(-101.0)


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    params = SamplingParams(min_tokens=2, stop_token_ids=[4])
    logits = SequenceLogits(params, [0], V, {EOS, 4}, grammar=None)
    for step in range(3):
        row = torch.tensor(ROW)
        logits.process(row)
        masked = math.isinf(row[EOS].item()) and math.isinf(row[4].item())
        assert masked == (step < 2)
        logits.accept(0)


def test_logprob_rows_apply_the_temperature():
    logits = torch.tensor([ROW], dtype=torch.float32)
    assert logprob_rows(logits, 0.0).tolist() == torch.log_softmax(logits, -1).tolist()
    assert logprob_rows(logits, 2.0)[0].tolist() == pytest.approx(
        torch.log_softmax(logits / 2.0, -1)[0].tolist()
    )


def test_token_logprobs_pick_the_token_and_leave_out_masked_alternatives():
    row = torch.tensor([[0.0, float("-inf"), float("-inf"), 1.0]])
    rows = torch.log_softmax(row, -1)
    [entry] = token_logprobs(rows, [0], top=3)
    assert entry.logprob == pytest.approx(math.log(1 / (1 + math.e)))
    assert [alt.token_id for alt in entry.top] == [3, 0]  # the -inf ones are not sent
    assert entry.top[1].logprob == entry.logprob  # the same float: lm-eval compares exactly
