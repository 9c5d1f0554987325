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

import math
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.kernels import native
from slimserve.kernels.base import pack_model_for_cpu
from slimserve.kernels.decode_step import (
    DecodeLayer,
    DecodeShape,
    NativeDecodeStep,
    NativeProjection,
)
from slimserve.kernels.dense_cpu import PackedLinear
from slimserve.kernels.fuse import fuse_linears

# Up to this many decoding sequences, attention is torch's fused SDPA over the query heads of
# each K/V head: a whole step was 4-8% faster at batch 1-2 with 60-200 cached positions (even at
# 500), level at batch 4 and 3% slower at 8, where the two batched matmuls below win.
SDPA_DECODE_MAX_BATCH = 2


# transformers' RMSNorm classes computing weight * (x / rms(x) in fp32).to(dtype); others (e.g.
# Gemma's 1 + weight) keep their own module.
_PLAIN_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class UnsupportedModelError(ValueError):
    pass


class _Dropped(nn.Module):
    """Stands where a projection was fused into another module; calling it is a bug."""

    def forward(self, *_: object) -> torch.Tensor:
        raise RuntimeError("this projection was fused; the runner computes it")


# q [N, H, D], k and v [N, Hkv, D]: one row per token
_Heads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class _RMSNorm:
    """The same RMSNorm as one fused fp32 op and the weight product: bit-identical to the module,
    3 eager ops instead of 7 (61 norms per step on the default model)."""

    def __init__(self, module: nn.Module) -> None:
        self.weight = module.weight
        self.eps = module.variance_epsilon
        self.shape = (module.weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)


def _norm(module: nn.Module) -> nn.Module | _RMSNorm:
    return _RMSNorm(module) if type(module).__name__ in _PLAIN_RMS_NORMS else module


def _native_projection(module: nn.Module) -> NativeProjection | None:
    """The module as the one-call decode step reads it, or None (plain or unpacked modules)."""
    describe = getattr(module, "native_projection", None)
    return None if describe is None else describe()


def _is_silu(act: object) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class _LayerPlan:
    """The matmuls of one decoder layer as the runner calls them."""

    def __init__(self, layer: nn.Module, packed: list[int] | None) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = _norm(layer.input_layernorm)
        self.post_norm = _norm(layer.post_attention_layernorm)
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


def _native_decode_layer(plan: _LayerPlan) -> bool:
    """The layer shape `_NativeOps` computes: fused q|k|v and gate|up, plain RMSNorms, SiLU,
    no per-head q/k norms."""
    return (
        plan.qkv is not None
        and plan.gate_up is not None
        and plan.q_norm is None
        and isinstance(plan.input_norm, _RMSNorm)
        and isinstance(plan.post_norm, _RMSNorm)
        and _is_silu(plan.act)
    )


def _fuse(modules: list[nn.Module], packed: list[int] | None) -> nn.Module | None:
    """One module for `modules` (dense ones prepacked), or None when fusing is off or
    impossible. Prepacked dense bytes are counted in `packed`."""
    if packed is None:
        return None
    fused = fuse_linears(modules)
    packed.append(_pack_for_cpu(fused))
    return fused


def _pack_for_cpu(module: nn.Module | None) -> int:
    """Prepacked bytes of a module fused here: dense ones arrive packed; compressed ones pack
    now."""
    if module is None:
        return 0
    return pack_model_for_cpu(module) + getattr(module, "packed_bytes", 0)


def _packed_or_same(owner: nn.Module, name: str, packed: list[int] | None) -> nn.Module:
    module = getattr(owner, name)
    if type(module) is not nn.Linear:
        return module  # a compressed module alone gains nothing from re-wrapping
    fused = _fuse([module], packed)
    if fused is None:
        return module
    setattr(owner, name, _Dropped())
    return fused


@dataclass
class PrefillChunk:
    """Prompt tokens [start, start + len(token_ids)) of the sequence in `slot`."""

    slot: int
    token_ids: list[int]
    start: int
    logits: Literal["none", "last", "all"] = "last"


@dataclass
class _DecodeView:
    """Where a step's decode tokens go in the cache, shared by every layer."""

    rows: torch.Tensor
    positions: torch.Tensor
    length: int  # keys to read per slot: the longest sequence's
    mask: torch.Tensor | None  # additive [B, 1, 1, length]; None when every key is visible

    @classmethod
    def build(cls, positions: list[int]) -> _DecodeView:
        pos = torch.tensor(positions, dtype=torch.long)
        length = max(positions) + 1
        mask = None  # keys past a sequence's own position hold another sequence's leftovers
        if min(positions) < length - 1:
            hidden = torch.arange(length).unsqueeze(0) > pos.unsqueeze(1)
            mask = torch.zeros(len(positions), length).masked_fill_(hidden, float("-inf"))
            mask = mask.view(len(positions), 1, 1, length)
        return cls(torch.arange(len(positions)), pos, length, mask)


_Logits = Callable[[torch.Tensor], torch.Tensor]


class _EagerOps:
    """A step's ops between the matmuls in torch: any norm module, activation and projection
    layout, any dtype. Decode and chunk rows are rotated together, one set of elementwise ops
    per layer."""

    def __init__(
        self, runner: LlamaRunner, decode_positions: list[int], chunks: Sequence[PrefillChunk]
    ) -> None:
        self.runner = runner
        self.batch = len(decode_positions)
        self.has_chunks = bool(chunks)
        positions = torch.tensor(decode_positions, dtype=torch.long)
        cos, sin = runner.cos[positions].unsqueeze(1), runner.sin[positions].unsqueeze(1)
        if chunks:
            chunk_cos, chunk_sin = runner._chunk_rotary(chunks)
            cos, sin = torch.cat([cos, chunk_cos]), torch.cat([sin, chunk_sin])
        self.cos, self.sin = cos, sin
        self.view = _DecodeView.build(decode_positions) if self.batch else None

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module | _RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm of it): the new residual and the next matmul's input."""
        if delta is not None:
            x = x + delta
        return x, norm(x)

    def attend_decode(
        self, layer: int, plan: _LayerPlan, qkv: torch.Tensor
    ) -> tuple[torch.Tensor | None, _Heads | None]:
        """Decode rows' attention output [B, H*D] and the chunk rows' rotated q, k, v."""
        runner, batch = self.runner, self.batch
        q, k, v = runner._rotate_qkv(plan, qkv, self.cos, self.sin)
        decoded = None
        if self.view is not None:
            decoded = runner._attend_decode(layer, self.view, q[:batch], k[:batch], v[:batch])
        return decoded, ((q[batch:], k[batch:], v[batch:]) if self.has_chunks else None)

    def gated(self, plan: _LayerPlan, h: torch.Tensor) -> torch.Tensor:
        if plan.gate_up is not None:
            gate, up = plan.gate_up(h).chunk(2, dim=-1)
        else:
            gate, up = plan.gate(h), plan.up(h)
        return plan.act(gate) * up

    def finish(
        self, x: torch.Tensor, delta: torch.Tensor, norm: nn.Module | _RMSNorm
    ) -> tuple[torch.Tensor, _Logits]:
        """The last residual add, and the logits of any of its rows: the final norm runs only
        on the rows whose logits are wanted."""
        lm_head = self.runner.lm_head
        return x + delta, lambda rows: lm_head(norm(rows)).float()


class _NativeOps:
    """A step's ops between the matmuls as native calls (bf16 or fp32), with the same roundings:
    residual add + RMSNorm (the residual updated in place), SiLU(gate) * up, and for the
    decoding sequences rotary + cache writes + attention, each over its own cached keys in
    place (cached keys bit-identical to the eager ops'). Prompt chunks' rotary stays eager."""

    def __init__(
        self,
        runner: LlamaRunner,
        kernels: native.NativeKernels,
        decode_positions: list[int],
        chunks: Sequence[PrefillChunk],
    ) -> None:
        self.runner = runner
        self.kernels = kernels
        self.batch = len(decode_positions)
        self.positions = torch.tensor(decode_positions, dtype=torch.long)
        self.chunk_rotary = runner._chunk_rotary(chunks) if chunks else None

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, norm: _RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.kernels.add_rms_norm(x, delta, norm.weight, norm.eps)

    def attend_decode(
        self, layer: int, plan: _LayerPlan, qkv: torch.Tensor
    ) -> tuple[torch.Tensor | None, _Heads | None]:
        runner, batch = self.runner, self.batch
        decoded = None
        if batch:
            decoded = self.kernels.decode_attention(
                qkv[:batch],
                runner.cos,
                runner.sin,
                runner.k_cache[layer],
                runner.v_cache[layer],
                self.positions,
                runner.n_heads,
                runner.scaling,
            )
        chunk_heads = None
        if self.chunk_rotary is not None:
            chunk_heads = runner._rotate_qkv(plan, qkv[batch:], *self.chunk_rotary)
        return decoded, chunk_heads

    def gated(self, plan: _LayerPlan, h: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_mul(plan.gate_up(h))

    def finish(
        self, x: torch.Tensor, delta: torch.Tensor, norm: _RMSNorm
    ) -> tuple[torch.Tensor, _Logits]:
        lm_head = self.runner.lm_head
        normed = self.kernels.add_rms_norm(x, delta, norm.weight, norm.eps)
        return normed, lambda rows: lm_head(rows).float()


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose memory the OS provides page by page as it is first written. The KV cache is
    sized for every slot at full length, which few workloads fill; torch.zeros writes all of
    it at start, so each engine process held its whole cache resident (~1.5 GB for SmolLM2-135M
    at 33 slots x 2048 positions) however little it served. Anonymous private pages read as
    zero until written, as torch.zeros' do."""
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)


class LlamaRunner:
    def __init__(
        self,
        model: nn.Module,
        max_slots: int,
        max_len: int,
        pack_dense: bool = False,
        store_slots: int = 0,
        store_len: int = 0,
    ) -> None:
        """`max_slots` sequences of up to `max_len` positions, plus a store of `store_slots`
        shorter ones (`store_len` positions: kept prompt prefixes) that `move_slot` addresses
        as slots max_slots.."""
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
        self.final_norm = _norm(inner.norm)
        shape = (len(inner.layers), max_slots, self.n_kv_heads, max_len, self.head_dim)
        self.k_cache = lazily_zeroed(shape, self.dtype)
        self.v_cache = lazily_zeroed(shape, self.dtype)
        store = (len(inner.layers), store_slots, self.n_kv_heads, store_len, self.head_dim)
        self.k_store = lazily_zeroed(store, self.dtype)
        self.v_store = lazily_zeroed(store, self.dtype)
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
        if isinstance(head, PackedLinear) and packed is not None:
            packed.append(head.with_native_gemm(model.lm_head.weight.detach()))
        self.lm_head = head if head is not None else model.lm_head
        if packed is not None:  # compressed modules left in the model, nested ones included
            packed.append(pack_model_for_cpu(model))
        self.packed_weight_bytes = sum(packed or [])
        # Between the matmuls, native calls: per layer, rotary + cache writes + attention of
        # every decoding sequence, residual add + RMSNorm, SiLU * up. Loading the library here
        # also keeps its build out of the first request.
        qkv_width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.native_decode = (
            self.dtype in native.STEP_OP_DTYPES
            and all(_native_decode_layer(plan) for plan in self.layers)
            and isinstance(self.final_norm, _RMSNorm)
            and native.decode_attention_supported(
                torch.empty(1, qkv_width, dtype=self.dtype),
                self.cos,
                self.k_cache[0],
                self.v_cache[0],
                self.n_heads,
            )
        )

        # Every layer of a decode-only step in one native call, where each projection is one
        # of our packed layouts (kernels/decode_step.py); else the per-call loop in `step`.
        self.native_step = self._one_call_step() if self.native_decode else None

    def _one_call_step(self) -> NativeDecodeStep | None:
        kernels = native.kernels()
        layers = []
        for index, plan in enumerate(self.layers):
            parts = [
                _native_projection(module) for module in (plan.qkv, plan.o, plan.gate_up, plan.down)
            ]
            if any(p is None or p.dtype != self.dtype or p.kernels is not kernels for p in parts):
                return None
            layers.append(
                DecodeLayer(
                    *parts,
                    input_norm=plan.input_norm.weight,
                    input_eps=plan.input_norm.eps,
                    post_norm=plan.post_norm.weight,
                    post_eps=plan.post_norm.eps,
                    k_cache=self.k_cache[index],
                    v_cache=self.v_cache[index],
                )
            )
        shape = DecodeShape(self.n_heads, self.n_kv_heads, self.head_dim, self.scaling)
        norm = self.final_norm
        return NativeDecodeStep(
            kernels, layers, self.cos, self.sin, norm.weight, norm.eps, shape, self.max_slots
        )

    @property
    def kv_cache_bytes(self) -> int:
        positions = self.k_cache.numel() + self.k_store.numel()
        return 2 * positions * self.k_cache.element_size()

    @staticmethod
    def _project_qkv(plan: _LayerPlan, h: torch.Tensor) -> torch.Tensor:
        """h [N, hidden] (one row per token) -> q | k | v rows [N, (H + 2 Hkv) * D]."""
        if plan.qkv is not None:
            return plan.qkv(h)
        return torch.cat([plan.q(h), plan.k(h), plan.v(h)], dim=-1)

    def _rotate_qkv(
        self, plan: _LayerPlan, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> _Heads:
        """Projected q | k | v rows [N, (H + 2 Hkv) * D] -> q [N, H, D], k and v [N, Hkv, D].

        q and k are rotated together: one set of elementwise ops per layer instead of two."""
        tokens = qkv.shape[0]
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
        qk = qk.unflatten(-1, (heads + kv_heads, dim))
        if plan.q_norm is not None:
            qk = torch.cat([plan.q_norm(qk[:, :heads]), plan.k_norm(qk[:, heads:])], dim=1)
        qk = qk * cos + _rotate_half(qk) * sin
        return qk[:, :heads], qk[:, heads:], v.reshape(tokens, kv_heads, dim)

    @staticmethod
    def _split_logits(
        rows: torch.Tensor,
        batch: int,
        chunks: Sequence[PrefillChunk],
        logits: _Logits,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """`step`'s return: `logits` of the decode rows (the first `batch`) and of each chunk's
        rows as it asked (all of them, or its last as [vocab]); None for what is absent. The
        wanted rows go through the head in one call."""
        wanted = list(range(batch))
        starts: list[int | None] = []  # where each chunk's logits begin among the wanted rows
        row = batch
        for chunk in chunks:
            n = len(chunk.token_ids)
            starts.append(None if chunk.logits == "none" else len(wanted))
            if chunk.logits == "all":
                wanted.extend(range(row, row + n))
            elif chunk.logits == "last":
                wanted.append(row + n - 1)
            row += n
        if not wanted:
            return None, [None] * len(chunks)
        out = logits(rows if len(wanted) == rows.shape[0] else rows[wanted])
        chunk_logits: list[torch.Tensor | None] = []
        for chunk, start in zip(chunks, starts, strict=True):
            if start is None:
                chunk_logits.append(None)
            elif chunk.logits == "last":
                chunk_logits.append(out[start])
            else:
                chunk_logits.append(out[start : start + len(chunk.token_ids)])
        return (out[:batch] if batch else None), chunk_logits

    def _check_chunks(self, batch: int, chunks: Sequence[PrefillChunk]) -> None:
        slots = [chunk.slot for chunk in chunks]
        for slot in slots:
            if not batch <= slot < self.max_slots:
                raise ValueError(f"prefill slot {slot} overlaps the {batch} decoding slots")
        if len(set(slots)) != len(slots):
            raise ValueError(f"two prompt chunks of one step share a slot: {slots}")

    def _chunk_rotary(self, chunks: Sequence[PrefillChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, 1, D] at the positions of every chunk's tokens, in row order."""
        span = torch.cat([torch.arange(c.start, c.start + len(c.token_ids)) for c in chunks])
        return self.cos[span].unsqueeze(1), self.sin[span].unsqueeze(1)

    def _attend_chunks(
        self,
        layer: int,
        chunks: Sequence[PrefillChunk],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Every chunk's rows of q, k, v attend over their own slot, one after another."""
        sizes = [len(chunk.token_ids) for chunk in chunks]
        return [
            self._attend_chunk(layer, chunk, *parts)
            for chunk, *parts in zip(
                chunks, q.split(sizes), k.split(sizes), v.split(sizes), strict=True
            )
        ]

    def step(
        self,
        decode_ids: list[int],
        decode_positions: list[int],
        chunks: Sequence[PrefillChunk] = (),
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """One forward pass over every token of the step: a next token for each decoding
        sequence (slots 0..B-1, at `decode_positions`) and chunks of prompts, each in its own
        slot past the decoding ones.

        All tokens share each layer's matmuls (one pass over the weights); only attention is
        split, since decode queries read their own slots and each chunk is causal over its slot.
        Returns (float32 decode logits [B, vocab] or None, per chunk its logits or None: [vocab]
        for its last token, or [n, vocab] with `chunk.logits == "all"`).

        Between the matmuls run native kernels when the model qualifies (`_NativeOps`), else
        torch ops (`_EagerOps`); the loop and the modules are the same. A step of decoding
        sequences alone runs every layer in one native call instead where each projection is
        one of our packed layouts (`native_step`, kernels/decode_step.py): the same kernels in
        the same order, the same logits.
        """
        batch = len(decode_ids)
        self._check_chunks(batch, chunks)
        if self._steps_in_one_call(batch, chunks):
            return self._one_call_decode(decode_ids, decode_positions)
        ops = self._step_ops(decode_positions, chunks)
        chunk_ids = [token for chunk in chunks for token in chunk.token_ids]
        x = self.embed(torch.tensor(list(decode_ids) + chunk_ids, dtype=torch.long))
        x = x.contiguous()  # the residual: the native norms update it in place
        delta = None  # what the last layer adds to the residual, added by the next norm
        for index, plan in enumerate(self.layers):
            x, h = ops.add_norm(x, delta, plan.input_norm)
            decoded, chunk_heads = ops.attend_decode(index, plan, self._project_qkv(plan, h))
            parts = [] if decoded is None else [decoded]
            if chunk_heads is not None:
                parts += self._attend_chunks(index, chunks, *chunk_heads)
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)
            x, h = ops.add_norm(x, plan.o(attn), plan.post_norm)
            delta = plan.down(ops.gated(plan, h))
        rows, logits = ops.finish(x, delta, self.final_norm)
        return self._split_logits(rows, batch, chunks, logits)

    def _steps_in_one_call(self, batch: int, chunks: Sequence[PrefillChunk]) -> bool:
        one_call = self.native_step
        if one_call is None or chunks or not 1 <= batch <= one_call.max_rows:
            return False
        return native.serving_kernels() is not None

    def _one_call_decode(
        self, decode_ids: list[int], decode_positions: list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """`step` for decoding sequences alone, every layer in one native call."""
        x = self.embed(torch.tensor(decode_ids, dtype=torch.long)).contiguous()
        rows = self.native_step.run(x, torch.tensor(decode_positions, dtype=torch.long))
        return self.lm_head(rows).float(), []

    def _step_ops(
        self, decode_positions: list[int], chunks: Sequence[PrefillChunk]
    ) -> _EagerOps | _NativeOps:
        kernels = native.serving_kernels() if self.native_decode else None
        if kernels is None:
            return _EagerOps(self, decode_positions, chunks)
        return _NativeOps(self, kernels, decode_positions, chunks)

    def _attend_decode(
        self, layer: int, view: _DecodeView, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Decode queries q [B, H, D]: cache this token's K/V, attend over each slot; [B, H*D].

        Query heads are grouped under their shared K/V head: the group is one block of queries
        against its K/V head, so nothing is expanded. From batch 3, two batched matmuls cover a
        layer (scores and softmax in float32); at batch 8-32 that was ~5x faster than the CPU
        scaled_dot_product_attention, whose flash kernel pays per (sequence, K/V head) block.
        At batch 1-2 there are few blocks and the fused kernel wins.
        """
        batch = q.shape[0]
        if batch == 1:  # plain slicing: a copy instead of an index_put
            position = view.length - 1
            self.k_cache[layer, 0, :, position] = k[0]
            self.v_cache[layer, 0, :, position] = v[0]
        else:
            self.k_cache[layer][view.rows, :, view.positions] = k
            self.v_cache[layer][view.rows, :, view.positions] = v
        keys = self.k_cache[layer, :batch, :, : view.length]
        values = self.v_cache[layer, :batch, :, : view.length]
        grouped = q.unflatten(1, (self.n_kv_heads, self.n_heads // self.n_kv_heads))
        if batch <= SDPA_DECODE_MAX_BATCH:
            out = F.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=view.mask, scale=self.scaling
            )
            return out.reshape(batch, -1)
        # matmul on these strided cache views copies them far slower than .contiguous() does
        # (379 vs 31 us for K at batch 26, 126 positions), so copy first.
        keys, values = keys.contiguous(), values.contiguous()
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * self.scaling
        if view.mask is not None:
            scores = scores + view.mask
        weights = scores.softmax(dim=-1).to(values.dtype)
        return torch.matmul(weights, values).reshape(batch, -1)

    def _attend_chunk(
        self, layer: int, chunk: PrefillChunk, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Prompt-chunk queries q [n, H, D]: cache their K/V, causal attention; [n, H*D]."""
        n = q.shape[0]
        start, end, slot = chunk.start, chunk.start + n, chunk.slot
        self.k_cache[layer, slot, :, start:end] = k.transpose(0, 1)
        self.v_cache[layer, slot, :, start:end] = v.transpose(0, 1)
        mask = None
        if start > 0:  # query i (at position start + i) sees cached keys 0..start + i
            mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            self.k_cache[layer, slot : slot + 1, :, :end],
            self.v_cache[layer, slot : slot + 1, :, :end],
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scaling,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1).reshape(n, -1)

    def prefill(
        self, slot: int, token_ids: list[int], start: int, want_logits: bool, every: bool = False
    ):
        """Run prompt tokens [start, start + n) of the sequence in `slot`; caches their K/V.

        Returns float32 logits [vocab] for the last token when want_logits (with `every`:
        [n, vocab], one row per token), else None.
        """
        logits = "all" if every else "last" if want_logits else "none"
        return self.step([], [], [PrefillChunk(slot, list(token_ids), start, logits)])[1][0]

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each sequence in slots 0..B-1; returns float32 logits [B, vocab]."""
        return self.step(token_ids, positions)[0]

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's first `length` cached positions to another slot (the batch
        compacted, a prefix kept in or taken from the store)."""
        if source == target or length == 0:
            return
        for cache, store in ((self.k_cache, self.k_store), (self.v_cache, self.v_store)):
            into, to = self._locate(cache, store, target)
            read, at = self._locate(cache, store, source)
            into[:, to, :, :length] = read[:, at, :, :length]

    def _locate(
        self, cache: torch.Tensor, store: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, int]:
        """The tensor holding `slot` and its index there."""
        return (cache, slot) if slot < self.max_slots else (store, slot - self.max_slots)
