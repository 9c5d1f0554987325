"""Where the quantizable pieces of a causal LM are: target Linears, decoder layers, and the
groups of Linears that read one input (with the op that produces it, for scale folding).

The folding groups follow the Llama family layout (Llama, Mistral, Qwen2, SmolLM):
input_layernorm -> q/k/v, v_proj -> o_proj, post_attention_layernorm -> gate/up, up_proj -> down.
Other layouts still quantize; their Linears just form one group each with nothing to fold into.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def target_linears(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear except the output head (tied to the embedding in small LMs) and `skip`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and not skipped(name, skip)
    ]


@functools.lru_cache(maxsize=8)
def _meta_linear_shapes(config_json: str, config_class: type) -> dict[str, tuple[int, int]]:
    from slimserve.models.loading import causal_lm_from_config

    config = config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = causal_lm_from_config(config)
    return {name: (m.out_features, m.in_features) for name, m in target_linears(model, [])}


def _fallback_shapes(config: Any) -> dict[str, tuple[int, int]]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    return {
        "*.q_proj": (heads * head_dim, hidden),
        "*.k_proj": (kv * head_dim, hidden),
        "*.v_proj": (kv * head_dim, hidden),
        "*.o_proj": (hidden, heads * head_dim),
        "*.gate_proj": (inter, hidden),
        "*.up_proj": (inter, hidden),
        "*.down_proj": (hidden, inter),
    }


def linear_shapes(model_config: Any) -> dict[str, tuple[int, int]]:
    """Qualified Linear name -> (out_features, in_features), read without loading weights.

    Builds the model on the meta device (no memory); falls back to the usual config fields.
    """
    try:
        return _meta_linear_shapes(model_config.to_json_string(), type(model_config))
    except Exception:
        return _fallback_shapes(model_config)


class UnsupportedArchitectureError(ValueError):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (the longest ModuleList of the model)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no ModuleList of decoder layers"
        )
    return max(lists, key=len)


def decoder_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder layer stack ("model.layers" in the Llama family)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def block_linears(
    model: nn.Module, skip: list[str], targets: list[str] | None = None
) -> dict[str, nn.Linear]:
    """Qualified name -> Linear inside the decoder blocks, minus `skip`, within `targets`."""
    prefix = decoder_prefix(model)
    found = {}
    for name, module in decoder_layers(model).named_modules():
        full = f"{prefix}.{name}"
        if not isinstance(module, nn.Linear) or skipped(full, skip):
            continue
        if targets is None or skipped(full, targets):  # `skipped` is the plain pattern match
            found[full] = module
    return found


def _foldable_norm(module: nn.Module | None, width: int) -> bool:
    # y = weight * normalized(x): dividing `weight` by s divides the output by s. Gemma-style
    # norms scale by (1 + weight) and are left alone.
    if module is None or "gemma" in type(module).__name__.lower():
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == width


@dataclass
class InputGroup:
    """Linears reading one input, and (optionally) the op whose output channels that input is.

    `repeat` > 1: each output channel of `prev` feeds `repeat` input channels of the Linears
    (grouped-query attention: one v head serves several query heads of o_proj); a folded scale
    must then be equal across those copies. `head_dim` gives the channel layout of the copies.
    """

    name: str
    linears: list[tuple[str, nn.Linear]]
    prev: nn.Module | None = None
    repeat: int = 1
    head_dim: int = 0

    @property
    def in_features(self) -> int:
        return self.linears[0][1].in_features


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def input_groups(layer: nn.Module, prefix: str, skip: list[str]) -> list[InputGroup]:
    """The input groups of one decoder layer; `prefix` is the layer's qualified name."""
    linears = {
        name: m
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear) and not skipped(f"{prefix}.{name}", skip)
    }
    groups: list[InputGroup] = []

    def take(group: str, names: list[str], prev: nn.Module | None, **kw: Any) -> None:
        present = [n for n in names if n in linears]
        if present:
            members = [(f"{prefix}.{n}", linears.pop(n)) for n in present]
            groups.append(InputGroup(group, members, prev, **kw))

    def norm(path: str, names: list[str]) -> nn.Module | None:
        module = _get(layer, path)
        widths = {linears[n].in_features for n in names if n in linears}
        return module if len(widths) == 1 and _foldable_norm(module, widths.pop()) else None

    def linear(path: str) -> nn.Linear | None:
        module = _get(layer, path)  # may itself be skipped and still take a folded scale
        return module if isinstance(module, nn.Linear) else None

    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    take("qkv", qkv, norm("input_layernorm", qkv))
    v, o = linear("self_attn.v_proj"), linears.get("self_attn.o_proj")
    if v is not None and o is not None and o.in_features % v.out_features == 0:
        head_dim = getattr(_get(layer, "self_attn"), "head_dim", 0)
        repeat = o.in_features // v.out_features
        ok = repeat == 1 or bool(head_dim and v.out_features % head_dim == 0)
        take("o", ["self_attn.o_proj"], v if ok else None, repeat=repeat, head_dim=head_dim)
    gate_up = ["mlp.gate_proj", "mlp.up_proj"]
    take("gate_up", gate_up, norm("post_attention_layernorm", gate_up))
    # down reads act(gate) * up: a scale on up's rows passes through unchanged.
    gated = _get(layer, "mlp.gate_proj") is not None
    take("down", ["mlp.down_proj"], linear("mlp.up_proj") if gated else None)
    for name in list(linears):
        take(name, [name], None)
    return groups
