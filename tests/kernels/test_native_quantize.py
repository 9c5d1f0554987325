"""slimserve's own W8A8 activation quantizer and rescale (kernels/cpu_quantize.cpp): the codes and
scales of torch's per-token ops bit for bit, at ragged widths, three dtypes, strided rows, zero
and large rows; and a packed W8A8 module gives the same output on either path."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import cpu_paths, native
from slimserve.kernels.dispatch import chosen_backends
from slimserve.kernels.w8a8 import W8A8Linear

from .helpers import AVX512_VNNI, cpu_has

pytestmark = pytest.mark.skipif(not cpu_has(*AVX512_VNNI), reason="this CPU has no AVX-512 VNNI")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rows(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    x *= torch.logspace(-2, 2, rows).unsqueeze(1)  # each row its own scale
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "k"), [(1, 576), (3, 17), (5, 1000), (2, 3)])
def test_codes_and_scales_are_torchs(dtype: torch.dtype, rows: int, k: int) -> None:
    x = _rows(rows, k, dtype, seed=k)
    codes, scales = native.kernels().quantize_rows_u8(x)
    expected_codes, expected_scales = cpu_paths.quantize_per_token_uint8(x)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes, expected_codes)
    assert codes.min() >= 1 and codes.max() <= 255  # symmetric: +-127 around 128


def test_strided_rows_zero_rows_and_ties() -> None:
    wide = _rows(4, 300, torch.bfloat16, seed=1)
    x = wide[:, :250]  # rows 300 apart
    x[1] = 0  # a zero row: the smallest scale, every code at the zero point
    x[2, :4] = torch.tensor([127.0, 0.5, -0.5, 1.5])  # halfway codes round to even
    assert native.quantize_rows_supported(x)
    codes, scales = native.kernels().quantize_rows_u8(x)
    expected_codes, expected_scales = cpu_paths.quantize_per_token_uint8(x)
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)
    assert (codes[1] == 128).all()
    assert not native.quantize_rows_supported(wide.t())  # column stride
    assert not native.quantize_rows_supported(wide.double())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rescale_rounds_as_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    acc = torch.randn(3, 37, generator=gen) * 1e4
    scales = torch.rand(3, 1, generator=gen) * 1e-3
    out = native.kernels().rescale_rows(acc, scales, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, acc.clone().mul_(scales).to(dtype))


@pytest.mark.parametrize("rows", [1, 8, 13])
def test_a_packed_w8a8_module_is_identical_on_either_path(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    qweight = torch.randint(-127, 128, (96, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(96, generator=gen) * 0.01 + 1e-3
    module = W8A8Linear.from_quantized(qweight, scale, None, torch.bfloat16)
    if module.pack_for_cpu() == 0:
        pytest.skip("this torch has no oneDNN int8 kernels")
    x = _rows(rows, 64, torch.bfloat16, seed=rows + 1)
    ours = module(x)
    assert "cpu-onednn-packed-native-quantize" in chosen_backends()["w8a8"]
    packed, zero_points = module.cpu_pack
    theirs = cpu_paths.onednn_int8_matmul(x, packed, module.weight_scale, zero_points)
    assert torch.equal(ours, theirs)
