import torch

from slimserve.serve.engine.sampling import make_generator, sample_tokens
from slimserve.serve.engine.types import SamplingParams


def test_greedy_is_argmax():
    logits = torch.randn(4, 100)
    params = [SamplingParams(temperature=0)] * 4
    assert sample_tokens(logits, params, [None] * 4) == logits.argmax(-1).tolist()


def test_seed_makes_sampling_reproducible_per_row():
    logits = torch.randn(3, 500)
    logits[2] = logits[0]
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 1)]

    def draw():
        gens = [make_generator(p) for p in params]
        return [sample_tokens(logits, params, gens) for _ in range(5)]

    first, second = draw(), draw()
    assert first == second
    assert [row[0] for row in first] == [row[2] for row in first]  # same seed, same logits


def test_tiny_top_p_keeps_only_the_best_token():
    logits = torch.randn(2, 300)
    params = [SamplingParams(temperature=1.5, top_p=1e-6, seed=s) for s in (3, 4)]
    gens = [make_generator(p) for p in params]
    for _ in range(10):
        assert sample_tokens(logits, params, gens) == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    params = [SamplingParams(temperature=1.0, seed=0)]
    gens = [make_generator(params[0])]
    draws = [sample_tokens(logits, params, gens)[0] for _ in range(3000)]
    assert abs(draws.count(0) / 3000 - 0.7) < 0.04
    assert abs(draws.count(2) / 3000 - 0.1) < 0.03


def test_extreme_but_valid_settings_sample_without_overflow():
    """Found by fuzzing the API: a top_p that rounds to 0 in float32, a temperature whose
    division overflows, seeds outside torch's range, and a row the grammar left empty."""
    logits = torch.randn(4, 300)
    logits[3] = float("-inf")
    params = [
        SamplingParams(temperature=1.0, top_p=5e-324, seed=2**63 + 100),
        SamplingParams(temperature=1e-30, seed=-7),
        SamplingParams(temperature=1e-6, seed=0),
        SamplingParams(temperature=1.0, seed=1),
    ]
    tokens = sample_tokens(logits, params, [make_generator(p) for p in params])
    best = logits.argmax(-1).tolist()
    assert tokens[:3] == best[:3]  # the nucleus of one token; greedy below 1e-5
    assert 0 <= tokens[3] < 300
