"""A whole decode step in one native call (`cpu_decode_step.cpp`).

Called one by one from Python, the ~150 kernel calls of a decode step (per layer: two residual
adds + RMSNorms, four projections, rotary + attention, SiLU * up) each pay a few microseconds of
interpreter, ctypes and allocation; in one call the int8 variant's step at one sequence went
from 8.5 to 5.9 ms at the avx2 level (kernels/README.md, "One native call per decode step").
The engine builds a
`NativeDecodeStep` once from its packed modules (each says, through `native_projection`, which
of our GEMMs reads its weight) and runs every layer and the final norm in one call; the kernels,
their order and their inputs are those of the per-call path, so the rows it returns are
bit-identical. A model with any other projection keeps the per-call path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from enum import IntEnum

import torch

from . import native


class ProjectKind(IntEnum):
    """Which of our packed layouts a projection is (`SlimProjectKind` in cpu_decode_step.h)."""

    F32_GEMM = 0
    W8A16_PANELS = 1
    BF16_GEMM = 2
    W8A16_GEMM = 3
    W8A8_GEMM = 4
    SPARSE24 = 5
    W4A16_GEMV = 6
    F32_GEMM_BF16_WEIGHTS = 7
    SPARSE24_BF16_VALUES = 8
    BF16_CODED_GEMM = 9
    SPARSE24_CODED = 10


STEP_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # SlimStepDtype


@dataclass(frozen=True)
class NativeProjection:
    """One projection as the one-call step reads it: rows [M, k] in `dtype` -> [M, n]."""

    kind: ProjectKind
    dtype: torch.dtype
    weight: torch.Tensor
    aux: torch.Tensor | None  # bias, scale or position codes, as the kind reads it
    n: int
    k: int
    kernels: native.NativeKernels  # the build that packed the weight
    max_rows: int | None = None  # the most rows its kernel takes; None: any
    zeros: torch.Tensor | None = None  # group-wise 4-bit: zero points beside `aux`'s scales
    group: int = 0


@dataclass(frozen=True)
class DecodeLayer:
    """One decoder layer's pieces: its projections, norms and this layer's K/V caches."""

    qkv: NativeProjection
    o: NativeProjection
    gate_up: NativeProjection
    down: NativeProjection
    input_norm: torch.Tensor
    input_eps: float
    post_norm: torch.Tensor
    post_eps: float
    k_cache: torch.Tensor  # [slots, kv_heads, max_len, head_dim]
    v_cache: torch.Tensor


@dataclass(frozen=True)
class DecodeShape:
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


class _Projection(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("weight", ctypes.c_void_p),
        ("aux", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("group", ctypes.c_int64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Projection),
        ("o", _Projection),
        ("gate_up", _Projection),
        ("down", _Projection),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("input_eps", ctypes.c_float),
        ("post_eps", ctypes.c_float),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("max_len", ctypes.c_int64),
        ("scaling", ctypes.c_float),
        ("dtype", ctypes.c_int32),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("final_eps", ctypes.c_float),
        ("layer", ctypes.POINTER(_Layer)),
    ]


def _projection(p: NativeProjection) -> _Projection:
    aux = None if p.aux is None else p.aux.data_ptr()
    zeros = None if p.zeros is None else p.zeros.data_ptr()
    dtype = STEP_DTYPES[p.dtype]
    return _Projection(p.kind, dtype, p.weight.data_ptr(), aux, zeros, p.n, p.k, p.group)


def _parts(layer: DecodeLayer) -> tuple[NativeProjection, ...]:
    return layer.qkv, layer.o, layer.gate_up, layer.down


def _check_shapes(layer: DecodeLayer, hidden: int, shape: DecodeShape) -> None:
    qkv_width = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    expected = {
        "qkv": (layer.qkv, qkv_width, hidden),
        "o": (layer.o, hidden, shape.heads * shape.head_dim),
        "gate_up": (layer.gate_up, 2 * layer.down.k, hidden),
        "down": (layer.down, hidden, layer.down.k),
    }
    for name, (projection, n, k) in expected.items():
        if (projection.n, projection.k) != (n, k):
            raise ValueError(f"{name} is {projection.n} x {projection.k}, the step needs {n} x {k}")


class NativeDecodeStep:
    """Every layer and the final norm of a decode step for up to `max_rows` sequences: the
    fewest that every projection's kernel takes, at most `max_rows` asked."""

    def __init__(
        self,
        kernels: native.NativeKernels,
        layers: list[DecodeLayer],
        cos: torch.Tensor,
        sin: torch.Tensor,
        final_norm: torch.Tensor,
        final_eps: float,
        shape: DecodeShape,
        max_rows: int,
    ) -> None:
        dtype = cos.dtype
        if dtype not in STEP_DTYPES or not layers:
            raise ValueError(f"a one-call decode step runs bf16 or fp32 layers, not {dtype}")
        hidden = final_norm.shape[0]
        for layer in layers:
            _check_shapes(layer, hidden, shape)
            if any(p.kernels is not kernels or p.dtype != dtype for p in _parts(layer)):
                raise ValueError("every projection must be this build's, in the step's dtype")
        tensors = [cos, sin, final_norm]
        for layer in layers:
            tensors += [layer.input_norm, layer.post_norm, layer.k_cache, layer.v_cache]
        if any(layer.k_cache.shape[2] != cos.shape[0] for layer in layers):
            raise ValueError("the caches and the rotary tables must cover the same positions")
        if any(not t.is_contiguous() or t.dtype != dtype for t in tensors):
            raise ValueError("norm weights, rotary tables and caches must be contiguous, one dtype")
        self.kernels = kernels
        self.dtype = dtype
        self.hidden = hidden
        self.layers = layers  # keeps every pointer below alive
        self._tables = (cos, sin, final_norm)
        self._c_layers = (_Layer * len(layers))(
            *(
                _Layer(
                    _projection(layer.qkv),
                    _projection(layer.o),
                    _projection(layer.gate_up),
                    _projection(layer.down),
                    layer.input_norm.data_ptr(),
                    layer.post_norm.data_ptr(),
                    layer.input_eps,
                    layer.post_eps,
                    layer.k_cache.data_ptr(),
                    layer.v_cache.data_ptr(),
                )
                for layer in layers
            )
        )
        self._model = _Model(
            len(layers),
            hidden,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            cos.shape[0],
            shape.scaling,
            STEP_DTYPES[dtype],
            cos.data_ptr(),
            sin.data_ptr(),
            final_norm.data_ptr(),
            final_eps,
            self._c_layers,
        )
        limits = [p.max_rows for layer in layers for p in _parts(layer) if p.max_rows is not None]
        self.max_rows = min([max_rows, *limits])
        model = ctypes.addressof(self._model)
        workspace = kernels.library.slim_decode_step_workspace_bytes(model, max_rows)
        self._workspace = torch.empty(int(workspace), dtype=torch.uint8)

    def run(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, hidden]: the embedded tokens of slots 0..B-1, at `positions` (int64 [B]); the
        residual is updated in place. Returns the final-normed rows [B, hidden]."""
        batch = x.shape[0]
        rows_fit = 1 <= batch <= self.max_rows and x.shape == (batch, self.hidden)
        if not rows_fit or x.dtype != self.dtype or not x.is_contiguous():
            raise ValueError(f"one-call decode step: rows {tuple(x.shape)} of {x.dtype}")
        plain = positions.shape == (batch,) and positions.stride(0) == 1
        if positions.dtype != torch.int64 or not plain:
            raise ValueError(f"one-call decode step: positions {positions.tolist()}")
        out = torch.empty(batch, self.hidden, dtype=self.dtype)
        status = self.kernels.library.slim_decode_step(
            ctypes.addressof(self._model),
            x.data_ptr(),
            batch,
            positions.data_ptr(),
            self._workspace.data_ptr(),
            out.data_ptr(),
        )
        if status != 0:
            raise ValueError(
                f"slim_decode_step refused {batch} rows at positions {positions.tolist()} "
                f"(cache length {self._model.max_len})"
            )
        return out
