"""Write a compressed model as a checkpoint vLLM loads with its own kernels (compressed-tensors).

Supported on vLLM's CPU build (0.32): W8A8 int8 (per-channel weights, dynamic per-token
activations) from `W8A8Linear`, and W4A16 group-wise with zero points from 4-bit `LowBitLinear`.
Packing and the quantization_config (its W8A8 / W4A16_ASYM preset schemes) come from the
compressed-tensors library itself, so the layout is the one vLLM reads.
Anything else (int8 weight-only, 3-bit, 2:4 sparse, int8 embeddings) has no vLLM CPU kernel and
is refused with a message naming the module, never exported in a lossy way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import compressed_tensors
import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    preset_name_to_scheme,
)
from safetensors.torch import save_file
from torch import nn

from slimserve.kernels import LowBitLinear, W8A8Linear
from slimserve.kernels.packing import unpack_int4

log = logging.getLogger(__name__)


# Bump when what is written changes in a way this file's code hash would not show.
EXPORT_FORMAT = "compressed-tensors/1"


class ExportError(ValueError):
    pass


def exporter_identity() -> dict[str, str]:
    """What shapes an export beyond the compressed model: this file's code, the format written
    and the compressed-tensors release whose presets and packing it uses."""
    return {
        "format": EXPORT_FORMAT,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        "compressed_tensors": compressed_tensors.__version__,
    }


def _preset(
    name: str, targets: list[str], fmt: CompressionFormat, **weights: Any
) -> QuantizationScheme:
    """A compressed-tensors preset scheme stored as `fmt`, with some weight arguments replaced."""
    scheme = preset_name_to_scheme(name, targets).model_dump()
    scheme["weights"].update(weights)
    return QuantizationScheme.model_validate({**scheme, "format": fmt.value})


def _w8a8_scheme(targets: list[str]) -> QuantizationScheme:
    # The preset is what W8A8Linear computes: per-channel symmetric int8 weights times dynamic
    # per-token symmetric int8 activations.
    return _preset("W8A8", targets, CompressionFormat.int_quantized)


def _w4a16_scheme(targets: list[str], group_size: int) -> QuantizationScheme:
    # Asymmetric group-wise int4 (integer zero points) as LowBitLinear stores it; the preset's
    # group size is replaced by the one the weights were quantized with.
    return _preset("W4A16_ASYM", targets, CompressionFormat.pack_quantized, group_size=group_size)


def _w8a8_tensors(name: str, module: W8A8Linear) -> dict[str, torch.Tensor]:
    tensors = {
        f"{name}.weight": module.qweight.contiguous(),
        f"{name}.weight_scale": module.weight_scale.float().view(-1, 1).contiguous(),
    }
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().contiguous()
    return tensors


def _w4a16_tensors(name: str, module: LowBitLinear) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    zeros = module.zeros.float()
    if not torch.equal(zeros, zeros.round()):
        raise ExportError(
            f"{name}: fractional zero points have no compressed-tensors form; "
            "vLLM needs integer zero points (quantize with integer zeros)"
        )
    # Our codes are unsigned [0, 16); compressed-tensors stores signed [-8, 8) values and
    # zero points, with w = (q - zp) * scale, so both shift by 8.
    signed = (unpack_int4(module.qweight).to(torch.int16) - 8).to(torch.int8)
    zero_points = (zeros.to(torch.int16) - 8).to(torch.int8)
    tensors = {
        f"{name}.weight_packed": pack_to_int32(signed, 4),
        f"{name}.weight_scale": module.scales.detach().contiguous(),
        f"{name}.weight_zero_point": pack_to_int32(zero_points, 4, packed_dim=0).contiguous(),
        f"{name}.weight_shape": torch.tensor([module.out_features, module.in_features]),
    }
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().contiguous()
    return tensors


def _is_stock(module: nn.Module) -> bool:
    """A torch or transformers module: vLLM knows its weights by their usual names."""
    return type(module).__module__.startswith(("torch.nn", "transformers."))


def _collect(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], set[int]]:
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    group_sizes: set[int] = set()
    compressed: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, W8A8Linear):
            tensors.update(_w8a8_tensors(name, module))
            groups.setdefault("w8a8", []).append(name)
        elif isinstance(module, LowBitLinear):
            if module.bits != 4:
                raise ExportError(f"{name}: {module.bits}-bit weights have no vLLM CPU kernel")
            tensors.update(_w4a16_tensors(name, module))
            groups.setdefault("w4a16", []).append(name)
            group_sizes.add(module.group_size)
        elif not _is_stock(module):
            raise ExportError(
                f"{name}: {type(module).__name__} has no vLLM CPU kernel; "
                "vLLM variants take W8A8 (SmoothQuant) or 4-bit weight-only compression"
            )
        else:
            continue
        compressed.add(name)
    # Everything else goes out as the plain weight it is.
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in compressed:
            tensors[key] = value.detach().contiguous()
    if len(group_sizes) > 1:
        raise ExportError(f"mixed 4-bit group sizes {sorted(group_sizes)} in one model")
    return tensors, groups, group_sizes


def export_for_vllm(model: nn.Module, tokenizer: Any, target: Path) -> Path:
    """Write `model` (after compression) into the new directory `target` as a compressed-tensors
    checkpoint. Not atomic: a caller that shares the result writes to staging and renames."""
    tensors, groups, group_sizes = _collect(model)
    if not groups:
        raise ExportError("no W8A8 or 4-bit modules to export; serve the checkpoint as it is")
    schemes: dict[str, QuantizationScheme | list[str]] = {}
    if "w8a8" in groups:
        schemes["group_w8a8"] = _w8a8_scheme(groups["w8a8"])
    if "w4a16" in groups:
        schemes["group_w4a16"] = _w4a16_scheme(groups["w4a16"], next(iter(group_sizes)))
    formats = {scheme.format for scheme in schemes.values()}
    config = model.config.to_dict()
    config["quantization_config"] = QuantizationConfig(
        config_groups=schemes,
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=["lm_head"],
    ).model_dump(mode="json")
    # A tied lm_head must not be written twice: safetensors refuses shared storage.
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    target.mkdir(parents=True)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(target)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)
    log.info("exported %s for vLLM: %s", target, {k: len(v) for k, v in groups.items()})
    return target
