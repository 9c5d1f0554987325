"""How decisive a greedy answer is: the smallest gap, over its tokens, between the best and the
second-best next token's log-probability, computed in fp64 with transformers.

Tests that expect two runs to answer alike token for token (streamed and whole, two engines)
compare runs whose bf16 arithmetic differs: a row's sums depend on the batch it shares, and
each CPU's libraries order them their own way (vLLM's AMX attention kernel moved a first
token's log-probabilities by up to 0.13 against the fp64 reference; the torch engine's greedy
answer to a prompt whose top two were 0.01 apart changed with its batch). Where the top two
tokens are closer than that, either may win on another CPU or in another batch. So those tests
ask only prompts whose answers clear `MIN_MARGIN_NATS` at every token, and check that they do.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimserve.models.store import resolve_model

# Several times the largest bf16 deviation from fp64 seen on one log-probability (0.13).
MIN_MARGIN_NATS = 0.5

# Prompts whose greedy answers clear it (test_decisive_prompts.py). Without "in one sentence"
# the question's first token had its top two 0.1 apart, and vLLM's AMX attention picked "L".
CAPITAL_QUESTION = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
]
CAPITAL_ANSWER_TOKENS = 20
COUNTING_PROMPTS = [
    "Numbers: 21, 22, 23,",
    "Page 1, page 2, page 3,",
    "1, 2, 3, 4, 5,",
    "11, 12, 13, 14,",
    "Even numbers: 2, 4, 6, 8,",
    "Countdown: ten, nine, eight,",
]
COUNTING_TOKENS = 32


@functools.cache
def _model(name: str) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def greedy_margin(model_name: str, prompt: str | list[dict], max_tokens: int) -> float:
    """The smallest top-2 gap along the greedy answer to a prompt (text, or chat messages
    through the model's chat template), up to `max_tokens` tokens or the end of the turn."""
    model, tokenizer = _model(model_name)
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    out = model.generate(
        ids,
        max_new_tokens=max_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    gaps = []
    for scores in out.scores:
        best, second = torch.log_softmax(scores[0], dim=-1).topk(2).values
        gaps.append(float(best - second))
    return min(gaps)
