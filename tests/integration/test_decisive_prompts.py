"""The prompts that tests expect two runs to answer alike are answered decisively (decisive.py):
at every token of the greedy answer, fp64's best next token leads the second by a margin no
bf16 rounding seen here moves."""

from __future__ import annotations

import pytest

from .decisive import (
    CAPITAL_ANSWER_TOKENS,
    CAPITAL_QUESTION,
    COUNTING_PROMPTS,
    COUNTING_TOKENS,
    MIN_MARGIN_NATS,
    greedy_margin,
)

MODEL = "smollm2-135m-instruct"


def test_the_capital_question_is_answered_decisively() -> None:
    assert greedy_margin(MODEL, CAPITAL_QUESTION, CAPITAL_ANSWER_TOKENS) >= MIN_MARGIN_NATS


@pytest.mark.parametrize("prompt", COUNTING_PROMPTS)
def test_each_counting_prompt_is_continued_decisively(prompt: str) -> None:
    assert greedy_margin(MODEL, prompt, COUNTING_TOKENS) >= MIN_MARGIN_NATS
