import torch
from torch import nn

from slimserve.compression import apply_compression, resident_weight_bytes
from slimserve.compression.methods.int8_weight_only import Int8WeightOnlySpec
from slimserve.kernels import Int8Embedding, Int8Linear, quantize_int8_absmax
from slimserve.kernels.int8 import int8_weight_matmul_reference

from .conftest import tiny_llama


def test_absmax_round_trip_error_is_within_half_a_step():
    weight = torch.randn(96, 80) * torch.linspace(0.1, 3, 96)[:, None]
    q, scale = quantize_int8_absmax(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()


def test_int8_linear_matches_reference_for_every_dtype():
    linear = nn.Linear(72, 40, bias=True)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        module = Int8Linear.from_linear(linear.to(dtype))
        x = torch.randn(7, 72).to(dtype)
        expected = int8_weight_matmul_reference(x.float(), module.qweight, module.scale.float())
        expected = expected + module.bias.float()
        out = module(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_compressing_a_model_halves_its_bytes_and_keeps_ties():
    model = tiny_llama(vocab_size=512, dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (1, 16))
    with torch.inference_mode():
        before_logits = model(ids).logits.float()
    before = resident_weight_bytes(model)
    report = apply_compression(model, [Int8WeightOnlySpec(method="int8-weight-only")])
    assert report.weight_bytes_before == before
    assert 1.8 < report.compression_ratio < 2.0
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == []  # every Linear was really replaced
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    head = model.get_output_embeddings()
    assert head.qweight.data_ptr() == model.get_input_embeddings().qweight.data_ptr()
    with torch.inference_mode():
        after_logits = model(ids).logits.float()
    agreement = (after_logits.argmax(-1) == before_logits.argmax(-1)).float().mean()
    assert agreement > 0.9


def test_skip_patterns_leave_modules_alone():
    model = tiny_llama(vocab_size=256)
    spec = Int8WeightOnlySpec(method="int8-weight-only", skip=["*.mlp.*"], include_embeddings=False)
    apply_compression(model, [spec])
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.layers.0.mlp.up_proj"] == "Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "Int8Linear"
    assert kinds["lm_head"] == "Linear"
