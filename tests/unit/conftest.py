"""Fixtures for fast unit tests: a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slimserve.models.store import DEFAULT_MODEL_ALIAS, resolve_model


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ALIAS))


def tiny_llama(
    vocab_size: int = 49152,
    seed: int = 0,
    dtype=torch.float32,
    layers: int = 2,
    initializer_range: float = 0.02,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A real model directory (weights + tokenizer + chat template) that loads in a second."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
