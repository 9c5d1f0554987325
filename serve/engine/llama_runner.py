"""Forward passes for Llama-family models over a slot-based KV cache.

The transformers model supplies the weights and modules (including whatever compressed Linear
modules were swapped in); this runner supplies the batched decode loop around them. The KV cache
is preallocated as [layers, slots, kv_heads, max_len, head_dim]; decoding sequences sit in slots
0..B-1 so a step reads a plain view of the cache, never a gathered copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedModelError(ValueError):
    pass


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LlamaRunner:
    def __init__(self, model: nn.Module, max_slots: int, max_len: int) -> None:
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, name) for name in needed):
            raise UnsupportedModelError(
                f"engine 'torch' runs Llama-family models (Llama, Mistral, Qwen2/3, SmolLM); "
                f"{type(model).__name__} is not one"
            )
        self.model = model
        self.layers = list(inner.layers)
        attn = self.layers[0].self_attn
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.max_len = max_len
        self.max_slots = max_slots
        self.dtype = next(model.parameters()).dtype
        shape = (len(self.layers), max_slots, self.n_kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.dtype)
        with torch.inference_mode():
            positions = torch.arange(max_len).unsqueeze(0)
            probe = torch.zeros(1, 1, cfg.hidden_size, dtype=self.dtype)
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos = cos[0].to(self.dtype)
        self.sin = sin[0].to(self.dtype)

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def _project_qkv(
        self, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, T, hidden] -> q [B, H, T, D], k and v [B, Hkv, T, D] with rotary applied."""
        attn = layer.self_attn
        batch, length, _ = h.shape
        q = attn.q_proj(h).view(batch, length, self.n_heads, self.head_dim)
        k = attn.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _finish_layer(
        self, layer: nn.Module, x: torch.Tensor, attn_out: torch.Tensor
    ) -> torch.Tensor:
        batch, _, length, _ = attn_out.shape
        attn_out = attn_out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden)).float()

    def prefill(self, slot: int, token_ids: list[int], start: int, want_logits: bool):
        """Run prompt tokens [start, start + n) of the sequence in `slot`; caches their K/V.

        Returns float32 logits [vocab] for the last token when want_logits, else None.
        """
        n = len(token_ids)
        end = start + n
        ids = torch.tensor(token_ids, dtype=torch.long).unsqueeze(0)
        x = self.model.model.embed_tokens(ids)
        cos = self.cos[start:end].view(1, 1, n, -1)
        sin = self.sin[start:end].view(1, 1, n, -1)
        mask = None
        if start > 0:  # query i (at position start + i) sees cached keys 0..start + i
            mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
        for index, layer in enumerate(self.layers):
            q, k, v = self._project_qkv(layer, layer.input_layernorm(x), cos, sin)
            self.k_cache[index, slot, :, start:end] = k[0]
            self.v_cache[index, slot, :, start:end] = v[0]
            keys = self.k_cache[index, slot : slot + 1, :, :end]
            values = self.v_cache[index, slot : slot + 1, :, :end]
            out = F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scaling,
                enable_gqa=True,
            )
            x = self._finish_layer(layer, x, out)
        return self._logits(x[0, -1]) if want_logits else None

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each sequence in slots 0..B-1; returns float32 logits [B, vocab]."""
        batch = len(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long).unsqueeze(1)
        pos = torch.tensor(positions, dtype=torch.long)
        length = int(pos.max()) + 1
        rows = torch.arange(batch)
        x = self.model.model.embed_tokens(ids)
        cos = self.cos[pos].view(batch, 1, 1, -1)
        sin = self.sin[pos].view(batch, 1, 1, -1)
        mask = (torch.arange(length).unsqueeze(0) <= pos.unsqueeze(1)).view(batch, 1, 1, length)
        for index, layer in enumerate(self.layers):
            q, k, v = self._project_qkv(layer, layer.input_layernorm(x), cos, sin)
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
            x = self._finish_layer(layer, x, out)
        return self._logits(x[:, -1])

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's cached K/V to another slot (when the batch is compacted)."""
        if source == target or length == 0:
            return
        self.k_cache[:, target, :, :length] = self.k_cache[:, source, :, :length]
        self.v_cache[:, target, :, :length] = self.v_cache[:, source, :, :length]
