"""The native greedy choice against torch.argmax: the same index on every row, ties and NaNs
included."""

import pytest
import torch

from slimserve.kernels import native
from slimserve.serve.engine.sampling import sample_tokens
from slimserve.serve.engine.types import SamplingParams

pytestmark = pytest.mark.usefixtures("each_isa")


@pytest.mark.parametrize("width", [1, 7, 16, 17, 33, 1000, 49152])
def test_argmax_matches_torch_with_ties(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    # Values on a coarse grid: many rows hold their largest value more than once.
    logits = torch.randint(-20, 21, (9, width), generator=gen).float() / 4
    logits[1] = float("-inf")  # all -inf: index 0
    logits[2, width // 2] = float("inf")
    logits[3, -1] = logits[3].max() + 1  # the largest in the last (often ragged) lane
    expected = logits.argmax(dim=-1).tolist()
    assert native.kernels().argmax_rows(logits) == expected


def test_argmax_returns_the_first_nan_as_torch_does() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    logits[0, 37] = logits[0, 80] = float("nan")
    logits[2, 99] = float("nan")
    logits[3, 0] = float("nan")
    assert (
        native.kernels().argmax_rows(logits)
        == logits.argmax(dim=-1).tolist()
        == [
            37,
            int(logits[1].argmax()),
            99,
            0,
        ]
    )


def test_argmax_reads_strided_rows() -> None:
    wide = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    logits = wide[:, 10:260]  # rows 300 apart
    assert native.argmax_rows_supported(logits)
    assert native.kernels().argmax_rows(logits) == logits.argmax(dim=-1).tolist()
    assert not native.argmax_rows_supported(wide.t())  # column stride
    assert not native.argmax_rows_supported(wide.double())
    assert not native.argmax_rows_supported(wide.bfloat16())


def test_greedy_rows_of_a_mixed_batch_take_it() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 500, generator=gen)
    greedy = SamplingParams(temperature=0)
    hot = SamplingParams(temperature=1.0, seed=5)
    sampler = torch.Generator().manual_seed(5)
    chosen = sample_tokens(logits, [greedy, hot, greedy], [None, sampler, None])
    assert chosen[0] == int(logits[0].argmax()) and chosen[2] == int(logits[2].argmax())
    assert 0 <= chosen[1] < 500
