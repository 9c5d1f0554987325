"""Perplexity and reference agreement."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimserve.compression.evaluation import (
    compare_to_reference,
    evaluation_ids,
    perplexity,
    sliding_windows,
)

from .conftest import tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: threads only add wake-up cost (large on a shared, busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class Negated(nn.Module):
    """The reference's logits turned upside down: its top token becomes the least likely."""

    def __init__(self, reference: nn.Module) -> None:
        super().__init__()
        self.reference = reference

    def forward(self, ids):
        return _Out(-self.reference(ids).logits)


class UniformLM(nn.Module):
    """Equal logits everywhere: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return _Out(torch.zeros(*ids.shape, self.vocab) + self.anchor)


@pytest.mark.parametrize(
    ("length", "context", "stride"), [(1000, 128, 64), (300, 512, 256), (257, 64, 48)]
)
def test_every_token_after_the_first_is_scored_once(length, context, stride):
    windows, mask = sliding_windows(torch.arange(length), context, stride)
    assert int(mask.sum()) == length - 1
    targets = windows[:, 1:][mask]
    assert sorted(targets.tolist()) == list(range(1, length))
    for row in range(1, len(windows)):  # later windows: at least context - stride history
        first = int(mask[row].nonzero()[0])
        assert first + 1 >= min(context, length) - stride


def test_non_overlapping_windows_skip_only_each_window_start():
    windows, mask = sliding_windows(torch.arange(256), 64, 64)
    assert len(windows) == 4 and int(mask.sum()) == 256 - 4


def test_uniform_model_has_perplexity_equal_to_vocab():
    ids = torch.randint(0, 50, (3, 100))
    assert perplexity(UniformLM(50), ids, context=64, stride=32) == pytest.approx(50, rel=1e-5)


def test_perplexity_matches_a_direct_computation_for_one_window():
    model = tiny_llama(vocab_size=256)
    ids = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    expected = math.exp(F.cross_entropy(logits, ids[0, 1:]).item())
    assert perplexity(model, ids, context=48, stride=48) == pytest.approx(expected, rel=1e-5)


def test_batching_does_not_change_the_result():
    model = tiny_llama(vocab_size=256)
    ids = torch.randint(0, 256, (2, 100))
    together = perplexity(model, ids, context=32, stride=16)
    one_by_one = perplexity(model, ids, context=32, stride=16, batch_size=1)
    assert together == pytest.approx(one_by_one, rel=1e-5)


def test_text_variant_uses_the_tokenizer(tokenizer):
    text = "def f(x):\n    return x + 1\n" * 20
    model = UniformLM(len(tokenizer))
    value = perplexity(model, tokenizer=tokenizer, text=text, context=32, stride=16)
    assert value == pytest.approx(len(tokenizer), rel=1e-4)
    held_out = evaluation_ids(tokenizer, max_tokens=100)
    assert held_out.shape == (1, 100)


def test_compare_to_itself_and_to_another_model():
    model = tiny_llama(vocab_size=256)
    windows = torch.randint(0, 256, (3, 20))
    same = compare_to_reference(model, model, windows)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    flipped = compare_to_reference(Negated(model), model, windows, batch_size=2)
    assert flipped["agreement"] == 0.0 and flipped["kl"] > 0.01
