"""Forward passes for Llama-family models over a slot-based KV cache.

The transformers model supplies the weights and modules (including whatever compressed Linear
modules were swapped in); this runner supplies the batched decode loop around them. With
`pack_dense`, plain dense projections are fused (q|k|v, gate|up) and prepacked for oneDNN on CPU,
and the originals are dropped to keep one copy of the weights: the runner then owns the model,
whose own forward no longer works.

The KV cache is preallocated as [layers, slots, kv_heads, max_len, head_dim]; decoding sequences
sit in slots 0..B-1 so a step reads a plain view of the cache, never a gathered copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.kernels.fuse import fuse_linears


class UnsupportedModelError(ValueError):
    pass


class _Dropped(nn.Module):
    """Stands where a projection was fused into another module; calling it is a bug."""

    def forward(self, *_: object) -> torch.Tensor:
        raise RuntimeError("this projection was fused; the runner computes it")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class _LayerPlan:
    """The matmuls of one decoder layer as the runner calls them."""

    def __init__(self, layer: nn.Module, packed: list[int] | None) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3-style per-head norms
        self.k_norm = getattr(attn, "k_norm", None)
        self.act = mlp.act_fn
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], packed)
        if self.qkv is None:
            self.q, self.k, self.v = attn.q_proj, attn.k_proj, attn.v_proj
        else:
            attn.q_proj = attn.k_proj = attn.v_proj = _Dropped()
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj], packed)
        if self.gate_up is None:
            self.gate, self.up = mlp.gate_proj, mlp.up_proj
        else:
            mlp.gate_proj = mlp.up_proj = _Dropped()
        self.o = _packed_or_same(attn, "o_proj", packed)
        self.down = _packed_or_same(mlp, "down_proj", packed)


def _fuse(modules: list[nn.Module], packed: list[int] | None) -> nn.Module | None:
    """One module for `modules` (dense ones prepacked), or None when fusing is off or
    impossible. Prepacked dense bytes are counted in `packed`."""
    if packed is None:
        return None
    fused = fuse_linears(modules)
    packed.append(getattr(fused, "packed_bytes", 0))
    return fused


def _packed_or_same(owner: nn.Module, name: str, packed: list[int] | None) -> nn.Module:
    module = getattr(owner, name)
    if type(module) is not nn.Linear:
        return module  # a compressed module alone gains nothing from re-wrapping
    fused = _fuse([module], packed)
    if fused is None:
        return module
    setattr(owner, name, _Dropped())
    return fused


class LlamaRunner:
    def __init__(
        self, model: nn.Module, max_slots: int, max_len: int, pack_dense: bool = False
    ) -> None:
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, name) for name in needed):
            raise UnsupportedModelError(
                f"engine 'torch' runs Llama-family models (Llama, Mistral, Qwen2/3, SmolLM); "
                f"{type(model).__name__} is not one"
            )
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = getattr(inner.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self.max_len = max_len
        self.max_slots = max_slots
        self.dtype = next(model.parameters()).dtype
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        shape = (len(inner.layers), max_slots, self.n_kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.dtype)
        with torch.inference_mode():
            positions = torch.arange(max_len).unsqueeze(0)
            probe = torch.zeros(1, 1, cfg.hidden_size, dtype=self.dtype)
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos = cos[0].to(self.dtype)
        self.sin = sin[0].to(self.dtype)
        packed: list[int] | None = [] if pack_dense else None
        self.layers = [_LayerPlan(layer, packed) for layer in inner.layers]
        # The lm_head is packed separately from a tied input embedding, which stays for lookups.
        head = _fuse([model.lm_head], packed) if type(model.lm_head) is nn.Linear else None
        self.lm_head = head if head is not None else model.lm_head
        self.packed_weight_bytes = sum(packed or [])

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def _project_qkv(
        self, plan: _LayerPlan, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, T, hidden] -> q [B, H, T, D], k and v [B, Hkv, T, D] with rotary applied."""
        batch, length, _ = h.shape
        if plan.qkv is not None:
            q_size = self.n_heads * self.head_dim
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = plan.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = plan.q(h), plan.k(h), plan.v(h)
        q = q.reshape(batch, length, self.n_heads, self.head_dim)
        k = k.reshape(batch, length, self.n_kv_heads, self.head_dim)
        v = v.reshape(batch, length, self.n_kv_heads, self.head_dim)
        if plan.q_norm is not None:
            q, k = plan.q_norm(q), plan.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _mlp(self, plan: _LayerPlan, h: torch.Tensor) -> torch.Tensor:
        if plan.gate_up is not None:
            gate, up = plan.gate_up(h).chunk(2, dim=-1)
        else:
            gate, up = plan.gate(h), plan.up(h)
        return plan.down(plan.act(gate) * up)

    def _finish_layer(
        self, plan: _LayerPlan, x: torch.Tensor, attn_out: torch.Tensor
    ) -> torch.Tensor:
        batch, _, length, _ = attn_out.shape
        attn_out = attn_out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        x = x + plan.o(attn_out)
        return x + self._mlp(plan, plan.post_norm(x))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden)).float()

    def prefill(
        self, slot: int, token_ids: list[int], start: int, want_logits: bool, every: bool = False
    ):
        """Run prompt tokens [start, start + n) of the sequence in `slot`; caches their K/V.

        Returns float32 logits [vocab] for the last token when want_logits (with `every`:
        [n, vocab], one row per token), else None.
        """
        n = len(token_ids)
        end = start + n
        x = self.embed(torch.tensor(token_ids, dtype=torch.long).unsqueeze(0))
        cos = self.cos[start:end].view(1, 1, n, -1)
        sin = self.sin[start:end].view(1, 1, n, -1)
        mask = None
        if start > 0:  # query i (at position start + i) sees cached keys 0..start + i
            mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
        for index, plan in enumerate(self.layers):
            q, k, v = self._project_qkv(plan, plan.input_norm(x), cos, sin)
            self.k_cache[index, slot, :, start:end] = k[0]
            self.v_cache[index, slot, :, start:end] = v[0]
            out = F.scaled_dot_product_attention(
                q,
                self.k_cache[index, slot : slot + 1, :, :end],
                self.v_cache[index, slot : slot + 1, :, :end],
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scaling,
                enable_gqa=True,
            )
            x = self._finish_layer(plan, x, out)
        if not want_logits:
            return None
        return self._logits(x[0] if every else x[0, -1])

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each sequence in slots 0..B-1; returns float32 logits [B, vocab]."""
        batch = len(token_ids)
        pos = torch.tensor(positions, dtype=torch.long)
        length = int(pos.max()) + 1
        rows = torch.arange(batch)
        x = self.embed(torch.tensor(token_ids, dtype=torch.long).unsqueeze(1))
        cos = self.cos[pos].view(batch, 1, 1, -1)
        sin = self.sin[pos].view(batch, 1, 1, -1)
        mask = (torch.arange(length).unsqueeze(0) <= pos.unsqueeze(1)).view(batch, 1, 1, length)
        for index, plan in enumerate(self.layers):
            q, k, v = self._project_qkv(plan, plan.input_norm(x), cos, sin)
            self.k_cache[index][rows, :, pos] = k[:, :, 0]
            self.v_cache[index][rows, :, pos] = v[:, :, 0]
            out = F.scaled_dot_product_attention(
                q,
                self.k_cache[index, :batch, :, :length],
                self.v_cache[index, :batch, :, :length],
                attn_mask=mask,
                scale=self.scaling,
                enable_gqa=True,
            )
            x = self._finish_layer(plan, x, out)
        return self._logits(x[:, -1])

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's cached K/V to another slot (when the batch is compacted)."""
        if source == target or length == 0:
            return
        self.k_cache[:, target, :, :length] = self.k_cache[:, source, :, :length]
        self.v_cache[:, target, :, :length] = self.v_cache[:, source, :, :length]
