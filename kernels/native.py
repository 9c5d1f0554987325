"""slimserve's own CPU kernels in C++ (`cpu_gemv.cpp`: W8A16 GEMV; `cpu_decode_attention.cpp`: a
decode step's rotary + cache writes + attention per sequence, residual add + RMSNorm, SiLU * up,
in bf16 or fp32; `cpu_w8a8.cpp`: W8A8 per-token activation quantization, rescale, and a GEMM for
few rows; `cpu_w8a16_gemm.cpp`: W8A16 on the W8A8 GEMM's packed layout, any rows;
`cpu_bf16_gemm.cpp`: a bf16 GEMM for dense bf16 weights, any rows; `cpu_bf16_coded.cpp`: the
same GEMM on a lossless layout of 12 bits a weight; `cpu_f32_gemm.cpp`: an fp32
GEMM on panels of fp32 or int8 weights, any rows; `cpu_sparse24.cpp`: 2:4 sparse GEMMs reading
only the kept half, fp32 and bf16; `cpu_sampling.cpp`: greedy choice per row),
built once per machine and ISA into one library and called through ctypes (which releases the
interpreter lock).

One source, one build per ISA level (`cpu_isa.py`, `cpu_simd.h`): `avx512` with AVX-512 VNNI /
BF16 instructions, `avx2` with the same AVX-512 intrinsics implemented on AVX2 + FMA + F16C by
SIMDe (exact: the same integer sums and the same roundings). `kernels()` loads the build for the
active level: the CPU's best, or lower where `SLIMSERVE_CPU_ISA` says.

A library is compiled on first use by torch's extension builder (`torch.utils.cpp_extension`,
ninja; the compiler is `CXX`, else `c++`) into `$SLIMSERVE_CACHE/native/<isa>/`; ninja rebuilds
it when a source, header or flag changes, and the builder's lock lets replicas starting together
build once. Where there is no compiler or the CPU has no level with native kernels,
`kernels()` returns None, the reason is logged once and the dispatch keeps torch's own CPU
kernels (the chosen backend shows in the variant's stats).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import cpp_extension

from . import cpu_isa
from .cpu_isa import Isa

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "cpu_gemv.cpp",
        "cpu_decode_attention.cpp",
        "cpu_w8a8.cpp",
        "cpu_w8a16_gemm.cpp",
        "cpu_bf16_gemm.cpp",
        "cpu_bf16_coded.cpp",
        "cpu_f32_gemm.cpp",
        "cpu_sparse24.cpp",
        "cpu_sampling.cpp",
        "cpu_threads.cpp",
        "cpu_decode_step.cpp",
    )
)
# No contraction of a product and a sum into one FMA unless a kernel asks for it by intrinsic:
# the step ops' fp32 rotary rounds after each op, as the eager ops it stands in for.
FLAGS = ("-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off")
# The avx512 build targets its instructions per function (cpu_simd.h); the avx2 build compiles
# the whole unit for AVX2 and takes the AVX-512 intrinsics from SIMDe's headers.
ISA_FLAGS = {
    Isa.AVX2: ("-mavx2", "-mfma", "-mf16c", "-DSLIM_ISA_AVX2", "-Wno-psabi"),
    Isa.AVX512: (),
}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Output channels per block of the 2:4 GEMMs' packed layout, by activation dtype.
SPARSE24_BLOCKS = {torch.float32: 8, torch.bfloat16: 16}
# The bf16 GEMM reads a weight from its coded layout (`cpu_bf16_coded.cpp`) where that takes at
# most this share of the plain layout's bytes: 0.76 on trained weights; weights whose high bytes
# spread wider (more than 16 in a chunk: raw chunks) keep the plain layout.
BF16_CODED_MAX_SHARE = 0.9
# The dtypes of the decode step's ops (attention, RMSNorm, SiLU * up) and their symbols' suffix.
STEP_OP_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}


class NativeBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    from slimserve.models.paths import cache_root

    return cache_root() / "native"


def _compiler() -> str:
    """The compiler torch's extension builder will run (`CXX`, else `c++`), checked up front so
    a missing one is reported by name."""
    compiler = os.environ.get("CXX", "c++")
    if not shutil.which(compiler):
        raise NativeBuildError(f"no C++ compiler {compiler!r} (set CXX, or install g++)")
    return compiler


def _isa_flags(isa: Isa) -> tuple[str, ...]:
    if isa != Isa.AVX2:
        return ISA_FLAGS[isa]
    try:
        import simde_py
    except ImportError as error:
        raise NativeBuildError(
            "the avx2 build needs SIMDe's headers (pip install simde-py)"
        ) from error
    return (*ISA_FLAGS[isa], f"-I{simde_py.get_include()}")


def build(isa: Isa | None = None) -> Path:
    """Compile the library for `isa` (default: the active level) unless it is up to date;
    returns its path.

    torch's extension builder does the work: ninja rebuilds what a changed source, header or
    flag touches, and a lock in the build directory lets replicas starting together build once
    and load the same file. The sources are plain C++ with a C ABI (no torch headers), called
    through ctypes, which releases the interpreter lock for every kernel call.
    """
    isa = cpu_isa.active() if isa is None else isa
    if isa == Isa.NONE:
        raise NativeBuildError("no native kernels at ISA level none")
    compiler = _compiler()
    flags = (*FLAGS, *_isa_flags(isa))
    directory = cache_dir() / isa.label
    directory.mkdir(parents=True, exist_ok=True)
    log.info("building slimserve's %s CPU kernels in %s unless up to date", isa.label, directory)
    try:
        path = cpp_extension.load(
            name=f"slimserve_cpu_{isa.label}",
            sources=[str(source) for source in SOURCES],
            extra_cflags=list(flags),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        names = " ".join(source.name for source in SOURCES)
        raise NativeBuildError(f"{compiler} failed on {names}:\n{str(error)[-2000:]}") from error
    return Path(path)


@dataclass
class NativeKernels:
    library: ctypes.CDLL
    isa: Isa
    # Whether the bf16 and W8A16 GEMMs take AMX tiles (each from its own row count): set_amx.
    amx: bool = False

    @property
    def threads(self) -> int:
        """Threads each matmul kernel call shares its output channels across (1 by default)."""
        return int(self.library.slim_threads())

    def set_threads(self, threads: int) -> None:
        """Threads for every later matmul call of this process (the W8A16, W4A16, W8A8, bf16 and
        fp32 kernels; cpu_threads.h): the calling thread plus threads - 1 workers, which poll
        briefly between calls and then sleep."""
        if threads < 1:
            raise ValueError(f"kernel threads must be >= 1, not {threads}")
        self.library.slim_set_threads(threads)

    @functools.cached_property
    def w8a16_code_limit(self) -> int:
        """Activation codes are in [-limit, limit], per row."""
        return int(self.library.slim_w8a16_code_limit())

    @functools.cached_property
    def w8a16_max_rows(self) -> int:
        """Rows one GEMV call takes: 8 on avx512 (VPDPBUSD at 1-2, VPMADDWD at 3-8), 32 on avx2
        (VPMADDWD; the weights come from memory once per call at any row count)."""
        return int(self.library.slim_w8a16_max_rows())

    @functools.cached_property
    def w4a16_max_rows(self) -> int:
        """Rows per pass of the 4-bit GEMV, which takes any row count in such passes: 32 on
        avx2, 0 on avx512 (torch's int4pack serves there)."""
        return int(self.library.slim_w4a16_max_rows())

    def w4a16_gemv(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
    ) -> torch.Tensor:
        """x [M, K] (fp32 / bf16 / fp16) @ dequant(qweight [N, K/2] (LowBitLinear's 4-bit
        layout), scales, zeros [N, K/G]).T -> [M, N] in x's dtype. Callers check
        `w4a16_gemv_supported` first."""
        x = x.contiguous()
        m, k = x.shape
        n = qweight.shape[0]
        out = torch.empty(m, n, dtype=x.dtype)
        status = self.library.slim_w4a16_gemv(
            x.data_ptr(), _DTYPE_CODES[x.dtype], m, k, qweight.data_ptr(), scales.data_ptr(),
            zeros.data_ptr(), _DTYPE_CODES[scales.dtype], group_size, n, out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"slim_w4a16_gemv refused M={m} K={k} N={n} G={group_size}")
        return out

    @functools.cached_property
    def w8a16_max_k(self) -> int:
        return int(self.library.slim_w8a16_max_k())

    @functools.cached_property
    def decode_attention_max_head_dim(self) -> int:
        return int(self.library.slim_decode_attention_max_head_dim())

    def w8a16_gemv(
        self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """x [M <= w8a16_max_rows, K] (fp32 / bf16 / fp16) @ (qweight [N, K] int8 * scale [N]).T
        -> [M, N] in x's dtype. Called per projection per decode step: kept lean."""
        x = x.contiguous()
        m, k = x.shape
        n = qweight.shape[0]
        out = torch.empty(m, n, dtype=x.dtype)
        status = self.library.slim_w8a16_gemv(
            x.data_ptr(),
            _DTYPE_CODES[x.dtype],
            m,
            k,
            qweight.data_ptr(),
            scale.data_ptr(),
            _DTYPE_CODES[scale.dtype],
            n,
            out.data_ptr(),
        )
        if status != 0:
            raise ValueError(f"slim_w8a16_gemv refused M={m} K={k} N={n}")
        return out

    def decode_attention(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: torch.Tensor,
        heads: int,
        scaling: float,
    ) -> torch.Tensor:
        """Every decoding sequence of a step, one layer, bf16 or fp32 (the dtype of every tensor
        but `positions`; the output's too). Sequence b: row b of qkv
        [B, (H + 2 Hkv) * D] (q | k | v of its new token, not yet rotated), slot b of the
        layer's caches [slots, Hkv, max_len, D] (its new key and value written at positions[b]),
        the cos / sin tables [max_len, D] -> attention output [B, H * D], each sequence over its
        own keys 0..positions[b]. positions: int64 [B]. Callers check
        `decode_attention_supported` first."""
        batch = qkv.shape[0]
        _, kv_heads, max_len, dim = k_cache.shape
        out = torch.empty(batch, heads * dim, dtype=qkv.dtype)
        status = self._by_dtype("slim_decode_attention", qkv.dtype)(
            qkv.data_ptr(),
            qkv.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            max_len,
            positions.data_ptr(),
            batch,
            heads,
            kv_heads,
            dim,
            scaling,
            out.data_ptr(),
        )
        if status != 0:
            raise ValueError(
                f"slim_decode_attention refused B={batch} H={heads} Hkv={kv_heads} D={dim} "
                f"positions {positions.tolist()} of {max_len}"
            )
        return out

    def quantize_rows_u8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] (fp32 / bf16 / fp16, unit column stride) -> (uint8 codes [M, K], fp32 scale
        [M, 1]): the codes of `cpu_paths.quantize_per_token_uint8`, bit for bit."""
        rows, k = x.shape
        codes = torch.empty(rows, k, dtype=torch.uint8)
        scales = torch.empty(rows, 1, dtype=torch.float32)
        status = self.library.slim_quantize_rows_u8(
            x.data_ptr(), _DTYPE_CODES[x.dtype], rows, k, x.stride(0), codes.data_ptr(),
            scales.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"slim_quantize_rows_u8 refused {x.dtype}")
        return codes, scales

    def rescale_rows(
        self, acc: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """fp32 acc [M, N] (contiguous) * scales [M, 1] fp32 -> [M, N] in dtype, rounded to
        nearest even: `acc.mul_(scales).to(dtype)` in one pass."""
        rows, n = acc.shape
        out = torch.empty(rows, n, dtype=dtype)
        status = self.library.slim_rescale_rows(
            acc.data_ptr(), scales.data_ptr(), rows, n, _DTYPE_CODES[dtype], out.data_ptr()
        )
        if status != 0:
            raise ValueError(f"slim_rescale_rows refused {dtype}")
        return out

    @functools.cached_property
    def w8a8_gemm_max_rows(self) -> int:
        return int(self.library.slim_w8a8_gemm_max_rows())

    @functools.cached_property
    def w8a8_gemm_max_k(self) -> int:
        return int(self.library.slim_w8a8_gemm_max_k())

    def w8a8_pack(self, qweight: torch.Tensor) -> torch.Tensor:
        """int8 [N, K] (contiguous) -> the GEMM's own layout (uint8, VNNI order, see
        cpu_w8a8.cpp)."""
        n, k = qweight.shape
        packed = torch.empty(int(self.library.slim_w8a8_packed_bytes(n, k)), dtype=torch.uint8)
        self.library.slim_w8a8_pack(qweight.contiguous().data_ptr(), n, k, packed.data_ptr())
        return packed

    def w8a8_gemm(
        self, x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor
    ) -> torch.Tensor:
        """x [M, K] (fp32 / bf16 / fp16, unit column stride), quantized per token as
        `quantize_rows_u8` does, @ (int8 weight [N, K] * weight_scale [N] fp32).T -> [M, N] in
        x's dtype, the weight `w8a8_pack`ed. Callers check `w8a8_gemm_supported` first."""
        return self._int8_gemm("slim_w8a8_gemm", x, packed, weight_scale)

    def _int8_gemm(
        self, name: str, x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor
    ) -> torch.Tensor:
        """One of the two int8-weight GEMMs, which share their arguments."""
        m, k = x.shape
        n = weight_scale.shape[0]
        out = torch.empty(m, n, dtype=x.dtype)
        status = getattr(self.library, name)(
            x.data_ptr(), _DTYPE_CODES[x.dtype], m, k, x.stride(0), packed.data_ptr(),
            weight_scale.data_ptr(), n, out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"{name} refused M={m} K={k} N={n} {x.dtype}")
        return out

    @functools.cached_property
    def w8a16_gemm_max_k(self) -> int:
        return int(self.library.slim_w8a16_gemm_max_k())

    @functools.cached_property
    def w8a16_gemm_code_limit(self) -> int:
        """Activation codes c = 255 * hi + lo span +-this (lo, hi in [-127, 127])."""
        return int(self.library.slim_w8a16_gemm_code_limit())

    @functools.cached_property
    def w8a16_gemm_available(self) -> bool:
        """False in the avx2 build (never served there: cpu_w8a16_gemm.cpp says why)."""
        return bool(self.library.slim_w8a16_gemm_available())

    def w8a16_gemm(
        self, x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor
    ) -> torch.Tensor:
        """x [M, K] (fp32 / bf16 / fp16, unit column stride) @ (int8 weight [N, K] *
        weight_scale [N] fp32).T -> [M, N] in x's dtype, the weight `w8a8_pack`ed (the two
        GEMMs read one layout)."""
        return self._int8_gemm("slim_w8a16_gemm", x, packed, weight_scale)

    def set_amx(self, on: bool) -> bool:
        """AMX tiles on or off for the bf16 GEMM (from 3 rows) and the W8A16 GEMM (from 16),
        where this CPU has AMX and the kernel lets the process use the tiles; returns whether
        they are on (never where AMX is not usable here, nor in the avx2 build)."""
        self.amx = bool(self.library.slim_amx_enable(int(on)))
        return self.amx

    @functools.cached_property
    def bf16_gemm_available(self) -> bool:
        """False where this CPU lacks AVX-512 BF16 or in the avx2 build (never called then)."""
        return bool(self.library.slim_bf16_gemm_cpu_supported())

    @functools.cached_property
    def f32_gemm_max_rows(self) -> int:
        """Rows it serves beside oneDNN's copy of a weight (the lm_head at the avx512 level)."""
        return int(self.library.slim_f32_gemm_max_rows())

    @property
    def f32_gemm_only_copy(self) -> bool:
        """Whether the fp32 GEMM's panels are a weight's only copy, serving every row count: at
        the avx2 level, where oneDNN's fp32 matmul is AVX2 code too and ours was 1.0-1.7x it from
        1 to 128 rows, dense fp32 and int8 (widened in registers) alike (kernels/README.md)."""
        return self.isa == Isa.AVX2

    def f32_pack(self, weight: torch.Tensor, *, bf16_storage: bool = True) -> torch.Tensor:
        """fp32 [N, K] -> the fp32 GEMM's own layout (panels of 24 channels, cpu_f32_gemm.cpp):
        in bf16 where every value is a bf16 number (a bf16 checkpoint computed in fp32: half the
        bytes read per step, bit-identical results) unless `bf16_storage` is False, else fp32.
        The packed tensor's dtype says which; `f32_gemm` reads either."""
        weight = weight.detach().contiguous()
        n, k = weight.shape
        elements = int(self.library.slim_f32_packed_elements(n, k))
        if bf16_storage and is_bf16_exact(weight):
            packed = torch.empty(elements, dtype=torch.bfloat16)
            self.library.slim_f32_pack_bf16(weight.data_ptr(), n, k, packed.data_ptr())
            return packed
        packed = torch.empty(elements, dtype=torch.float32)
        self.library.slim_f32_pack(weight.data_ptr(), n, k, packed.data_ptr())
        return packed

    def f32_gemm(
        self, x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """fp32 x [M >= 1, K] (unit column stride) @ weight.T + bias -> fp32 [M, N], the weight
        `f32_pack`ed (fp32 or bf16 panels)."""
        m, k = x.shape
        out = torch.empty(m, n, dtype=torch.float32)
        name = "slim_f32_gemm_bf16" if packed.dtype == torch.bfloat16 else "slim_f32_gemm"
        status = getattr(self.library, name)(
            x.data_ptr(), m, k, x.stride(0), packed.data_ptr(),
            None if bias is None else bias.data_ptr(), n, out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"{name} refused M={m} K={k} N={n}")
        return out

    def w8a16_panels_pack(self, qweight: torch.Tensor) -> torch.Tensor:
        """int8 [N, K] -> the fp32 GEMM's panels, in int8 (`w8a16_panels_gemm` reads them)."""
        n, k = qweight.shape
        packed = torch.empty(int(self.library.slim_f32_packed_elements(n, k)), dtype=torch.int8)
        self.library.slim_w8a16_panels_pack(
            qweight.contiguous().data_ptr(), n, k, packed.data_ptr()
        )
        return packed

    def w8a16_panels_gemm(
        self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """fp32 x [M >= 1, K] (unit column stride) @ (int8 weight [N, K] * scale [N] fp32).T ->
        fp32 [M, N], the weight `w8a16_panels_pack`ed: each weight widened to fp32 in registers,
        fp32 products and sums."""
        m, k = x.shape
        n = scale.shape[0]
        out = torch.empty(m, n, dtype=torch.float32)
        status = self.library.slim_w8a16_panels_gemm(
            x.data_ptr(), m, k, x.stride(0), packed.data_ptr(), scale.data_ptr(), n,
            out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"slim_w8a16_panels_gemm refused M={m} K={k} N={n}")
        return out

    def bf16_pack(self, weight: torch.Tensor, *, coded: bool = True) -> torch.Tensor:
        """bf16 [N, K] -> the bf16 GEMM's own layout: the coded one (uint8, `cpu_bf16_coded.cpp`:
        each high byte in 4 bits, the same results from 3/4 of the bytes) unless `coded` is
        False or it would keep more than `BF16_CODED_MAX_SHARE` of the plain layout's bytes,
        else the plain one (bf16, `cpu_bf16_gemm.cpp`). The packed tensor's dtype says which;
        `bf16_gemm` reads either."""
        weight = weight.detach().contiguous()
        n, k = weight.shape
        plain = int(self.library.slim_bf16_packed_elements(n, k))
        if coded:
            offsets, _ = self.bf16_coded_layout(weight)
            if int(offsets[-1]) <= BF16_CODED_MAX_SHARE * 2 * plain:
                return self._bf16_coded_pack(weight, offsets)
        packed = torch.empty(plain, dtype=torch.bfloat16)
        self.library.slim_bf16_pack(weight.data_ptr(), n, k, packed.data_ptr())
        return packed

    def bf16_coded_layout(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The coded layout of a bf16 [N, K]: each tile's byte offset (int64, the last one the
        total) and how many of its chunks keep their high bytes raw."""
        weight = weight.detach().contiguous()
        n, k = weight.shape
        offsets = torch.empty(int(self.library.slim_bf16_coded_tiles(n)) + 1, dtype=torch.int64)
        raw = self.library.slim_bf16_coded_layout(weight.data_ptr(), n, k, offsets.data_ptr())
        return offsets, int(raw)

    def bf16_coded_pack(self, weight: torch.Tensor) -> torch.Tensor:
        """bf16 [N, K] -> the coded layout (uint8), whatever its size."""
        weight = weight.detach().contiguous()
        return self._bf16_coded_pack(weight, self.bf16_coded_layout(weight)[0])

    def _bf16_coded_pack(self, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        packed = torch.empty(int(offsets[-1]), dtype=torch.uint8)
        self.library.slim_bf16_coded_pack(
            weight.data_ptr(), n, k, offsets.data_ptr(), packed.data_ptr()
        )
        return packed

    def bf16_gemm(
        self, x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """bf16 x [M >= 1, K] (unit column stride) @ weight.T + bias -> bf16 [M, N], the weight
        `bf16_pack`ed (either layout: the same bits); fp32 sums. Callers check
        `bf16_gemm_available` first."""
        m, k = x.shape
        out = torch.empty(m, n, dtype=torch.bfloat16)
        name = "slim_bf16_coded_gemm" if packed.dtype == torch.uint8 else "slim_bf16_gemm"
        status = getattr(self.library, name)(
            x.data_ptr(), m, k, x.stride(0), packed.data_ptr(),
            None if bias is None else bias.data_ptr(), n, out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"{name} refused M={m} K={k} N={n}")
        return out

    def sparse24_coded_pack(
        self, values: torch.Tensor, codes: torch.Tensor, n: int, k: int, *, always: bool = False
    ) -> torch.Tensor | None:
        """bf16 2:4 blocks (`packing.pack_24_blocks`, 16 channels) -> the coded layout (uint8,
        cpu_bf16_coded.h: the kept values' high bytes in 4 bits, one stream a tile, the same
        bits out), or None where it would keep more than `BF16_CODED_MAX_SHARE` of the blocks'
        bytes (unless `always`)."""
        offsets = torch.empty(int(self.library.slim_bf16_coded_tiles(n)) + 1, dtype=torch.int64)
        args = (values.data_ptr(), codes.data_ptr(), n, k)
        self.library.slim_sparse24_coded_layout(*args, offsets.data_ptr())
        plain = values.numel() * values.element_size() + codes.numel() * codes.element_size()
        if not always and int(offsets[-1]) > BF16_CODED_MAX_SHARE * plain:
            return None
        packed = torch.empty(int(offsets[-1]), dtype=torch.uint8)
        self.library.slim_sparse24_coded_pack(*args, offsets.data_ptr(), packed.data_ptr())
        return packed

    def sparse24_gemm(
        self, x: torch.Tensor, values: torch.Tensor, codes: torch.Tensor | None, n: int
    ) -> torch.Tensor:
        """x [M, K] (fp32, or bf16 where `bf16_gemm_available`; unit column stride) @ W.T ->
        [M, N] in x's dtype, W 2:4 sparse along K in `packing.pack_24_blocks`'s layout (blocks
        of `SPARSE24_BLOCKS[x.dtype]` channels, values in x's dtype, or in bf16 for fp32 rows
        where they are all bf16 numbers: `bf16_high_halves`), or for bf16 rows in the coded
        layout (uint8 `values` from `sparse24_coded_pack`, no `codes`)."""
        m, k = x.shape
        out = torch.empty(m, n, dtype=x.dtype)
        if values.dtype == torch.uint8:  # bf16 rows, the coded layout (`sparse24_coded_pack`)
            status = self.library.slim_sparse24_bf16_coded(
                x.data_ptr(), m, k, x.stride(0), values.data_ptr(), n, out.data_ptr()
            )
            if status != 0:
                raise ValueError(f"slim_sparse24_bf16_coded refused M={m} K={k} N={n}")
            return out
        if x.dtype == torch.bfloat16:
            name = "slim_sparse24_bf16"
        elif values.dtype == torch.bfloat16:  # fp32 rows, values kept as bf16 numbers
            name = "slim_sparse24_f32_bf16"
        else:
            name = "slim_sparse24_f32"
        status = getattr(self.library, name)(
            x.data_ptr(), m, k, x.stride(0), values.data_ptr(), codes.data_ptr(), n,
            out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"{name} refused M={m} K={k} N={n}")
        return out

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """bf16 or fp32 rows [R, n]: x += delta in place (unless None), then RMSNorm(x) * weight
        per row as a new tensor, rounded as transformers' Llama RMSNorm rounds. x must be
        contiguous; delta and weight of x's dtype."""
        out = torch.empty_like(x)
        rows, n = x.shape
        self._by_dtype("slim_add_rms_norm", x.dtype)(
            x.data_ptr(),
            None if delta is None else delta.contiguous().data_ptr(),
            weight.data_ptr(),
            rows,
            n,
            eps,
            out.data_ptr(),
        )
        return out

    def argmax_rows(self, logits: torch.Tensor) -> list[int]:
        """fp32 [R, V] (unit column stride, V >= 1) -> torch.argmax(logits, -1).tolist(): the
        first largest, or the first NaN. Callers check `argmax_rows_supported` first."""
        rows = logits.shape[0]
        out = torch.empty(rows, dtype=torch.int64)
        self.library.slim_argmax_rows_f32(
            logits.data_ptr(), rows, logits.shape[1], logits.stride(0), out.data_ptr()
        )
        return out.tolist()

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """bf16 or fp32 [R, 2n] = gate | up -> [R, n] silu(gate) * up, rounded as the eager ops
        round."""
        gate_up = gate_up.contiguous()
        rows, n = gate_up.shape[0], gate_up.shape[-1] // 2
        out = torch.empty(rows, n, dtype=gate_up.dtype)
        self._by_dtype("slim_silu_mul", gate_up.dtype)(gate_up.data_ptr(), rows, n, out.data_ptr())
        return out

    def _by_dtype(self, name: str, dtype: torch.dtype) -> Any:
        """The step op `name` built for `dtype` (bf16 or fp32)."""
        suffix = STEP_OP_DTYPES.get(dtype)
        if suffix is None:
            raise TypeError(f"{name} runs on bf16 or fp32, not {dtype}")
        return getattr(self.library, f"{name}_{suffix}")


def _load(path: Path, isa: Isa) -> NativeKernels:
    library = ctypes.CDLL(str(path))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.slim_cpu_supported.restype = cint
    library.slim_cpu_supported.argtypes = []
    limits = (
        "slim_w8a16_code_limit",
        "slim_w8a16_max_k",
        "slim_decode_attention_max_head_dim",
        "slim_w8a8_gemm_max_rows",
        "slim_w8a8_gemm_max_k",
        "slim_w8a16_max_rows",
        "slim_w4a16_max_rows",
        "slim_f32_gemm_max_rows",
        "slim_w8a16_gemm_max_k",
        "slim_w8a16_gemm_code_limit",
    )
    for name in limits:
        getattr(library, name).restype = i64
        getattr(library, name).argtypes = []
    library.slim_set_threads.restype = None
    library.slim_set_threads.argtypes = [cint]
    library.slim_threads.restype = cint
    library.slim_threads.argtypes = []
    library.slim_w8a16_gemv.restype = cint
    library.slim_w8a16_gemv.argtypes = [ptr, cint, i64, i64, ptr, ptr, cint, i64, ptr]
    library.slim_f32_packed_elements.restype = i64
    library.slim_f32_packed_elements.argtypes = [i64, i64]
    library.slim_f32_pack.restype = None
    library.slim_f32_pack.argtypes = [ptr, i64, i64, ptr]
    library.slim_f32_pack_bf16.restype = None
    library.slim_f32_pack_bf16.argtypes = [ptr, i64, i64, ptr]
    library.slim_w8a16_panels_pack.restype = None
    library.slim_w8a16_panels_pack.argtypes = [ptr, i64, i64, ptr]
    library.slim_w8a16_panels_gemm.restype = cint
    library.slim_w8a16_panels_gemm.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr]
    library.slim_f32_gemm.restype = cint
    library.slim_f32_gemm.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr]
    library.slim_f32_gemm_bf16.restype = cint
    library.slim_f32_gemm_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr]
    library.slim_w4a16_gemv.restype = cint
    library.slim_w4a16_gemv.argtypes = [ptr, cint, i64, i64, ptr, ptr, ptr, cint, i64, i64, ptr]
    for suffix in STEP_OP_DTYPES.values():
        getattr(library, f"slim_add_rms_norm_{suffix}").restype = None
        getattr(library, f"slim_add_rms_norm_{suffix}").argtypes = [
            ptr, ptr, ptr, i64, i64, ctypes.c_float, ptr,
        ]  # fmt: skip
        getattr(library, f"slim_silu_mul_{suffix}").restype = None
        getattr(library, f"slim_silu_mul_{suffix}").argtypes = [ptr, i64, i64, ptr]
        getattr(library, f"slim_decode_attention_{suffix}").restype = cint
        getattr(library, f"slim_decode_attention_{suffix}").argtypes = [
            ptr,  # qkv
            i64,  # its row stride
            *(ptr,) * 4,  # cos, sin, k_cache, v_cache
            i64,  # max_len
            ptr,  # positions
            *(i64,) * 4,  # batch, heads, kv_heads, head_dim
            ctypes.c_float,
            ptr,
        ]
    library.slim_argmax_rows_f32.restype = None
    library.slim_argmax_rows_f32.argtypes = [ptr, i64, i64, i64, ptr]
    library.slim_quantize_rows_u8.restype = cint
    library.slim_quantize_rows_u8.argtypes = [ptr, cint, i64, i64, i64, ptr, ptr]
    library.slim_bf16_gemm_cpu_supported.restype = cint
    library.slim_amx_enable.restype = cint
    library.slim_amx_enable.argtypes = [cint]
    library.slim_bf16_gemm_cpu_supported.argtypes = []
    library.slim_bf16_gemm.restype = cint
    library.slim_bf16_gemm.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr]
    library.slim_bf16_pack.restype = None
    library.slim_bf16_pack.argtypes = [ptr, i64, i64, ptr]
    library.slim_bf16_packed_elements.restype = i64
    library.slim_bf16_packed_elements.argtypes = [i64, i64]
    library.slim_bf16_coded_tiles.restype = i64
    library.slim_bf16_coded_tiles.argtypes = [i64]
    library.slim_bf16_coded_layout.restype = i64
    library.slim_bf16_coded_layout.argtypes = [ptr, i64, i64, ptr]
    library.slim_bf16_coded_pack.restype = None
    library.slim_bf16_coded_pack.argtypes = [ptr, i64, i64, ptr, ptr]
    library.slim_bf16_coded_gemm.restype = cint
    library.slim_bf16_coded_gemm.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr]
    library.slim_w8a8_gemm.restype = cint
    library.slim_w8a8_gemm.argtypes = [ptr, cint, i64, i64, i64, ptr, ptr, i64, ptr]
    library.slim_w8a8_pack.restype = None
    library.slim_w8a8_pack.argtypes = [ptr, i64, i64, ptr]
    library.slim_w8a8_packed_bytes.restype = i64
    library.slim_w8a8_packed_bytes.argtypes = [i64, i64]
    library.slim_w8a16_gemm_available.restype = cint
    library.slim_w8a16_gemm_available.argtypes = []
    library.slim_w8a16_gemm.restype = cint
    library.slim_w8a16_gemm.argtypes = [ptr, cint, i64, i64, i64, ptr, ptr, i64, ptr]
    library.slim_sparse24_coded_layout.restype = i64
    library.slim_sparse24_coded_layout.argtypes = [ptr, ptr, i64, i64, ptr]
    library.slim_sparse24_coded_pack.restype = None
    library.slim_sparse24_coded_pack.argtypes = [ptr, ptr, i64, i64, ptr, ptr]
    library.slim_sparse24_bf16_coded.restype = cint
    library.slim_sparse24_bf16_coded.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr]
    for name in ("slim_sparse24_f32", "slim_sparse24_f32_bf16", "slim_sparse24_bf16"):
        getattr(library, name).restype = cint
        getattr(library, name).argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr]
    library.slim_decode_step_workspace_bytes.restype = i64
    library.slim_decode_step_workspace_bytes.argtypes = [ptr, i64]
    library.slim_decode_step.restype = cint
    library.slim_decode_step.argtypes = [ptr, ptr, i64, ptr, ptr, ptr]
    library.slim_rescale_rows.restype = cint
    library.slim_rescale_rows.argtypes = [ptr, ptr, i64, i64, cint, ptr]
    return NativeKernels(library, isa)


def kernels() -> NativeKernels | None:
    """The library for the active ISA level, or None (reason logged once) where none runs."""
    return kernels_for(cpu_isa.active())


@functools.cache
def kernels_for(isa: Isa) -> NativeKernels | None:
    """The library built for `isa`, or None (reason logged once) where it cannot run here."""
    if os.environ.get("SLIMSERVE_NATIVE_KERNELS", "1") == "0":
        log.warning("native CPU kernels disabled by SLIMSERVE_NATIVE_KERNELS=0")
        return None
    if isa == Isa.NONE:
        log.warning("native CPU kernels need AVX2 + FMA + F16C; at ISA level none (this CPU, or "
                    "%s) torch's CPU kernels run instead", cpu_isa.ISA_ENV)  # fmt: skip
        return None
    try:
        loaded = _load(build(isa), isa)
    except (NativeBuildError, OSError) as error:
        log.warning("native CPU kernels unavailable, torch's CPU kernels run instead: %s", error)
        return None
    if not loaded.library.slim_cpu_supported():
        needs = ", ".join(cpu_isa.ISA_FLAGS[isa])
        log.warning("the %s CPU kernels need %s; this CPU lacks one", isa.label, needs)
        return None
    amx = cpu_isa.has_amx()
    if loaded.set_amx(amx) != amx and loaded.bf16_gemm_available:
        log.warning("this CPU has AMX but Linux refused this process the tiles' state "
                    "(arch_prctl); the bf16 GEMM stays on its AVX-512 tiles")  # fmt: skip
    log.info(
        "slimserve's CPU kernels run at ISA level %s%s",
        isa.label,
        ", the bf16 and W8A16 GEMMs on AMX tiles" if loaded.amx else "",
    )
    return loaded


def serving_kernels() -> NativeKernels | None:
    """The library where a call may use it now: our kernels run on the calling thread, so they
    serve only while torch computes on one thread (an engine's default on 2 cores, as vLLM's CPU
    engine). With more threads torch's and oneDNN's kernels, which use them, run instead."""
    return kernels() if torch.get_num_threads() == 1 else None


def w8a16_gemv_supported(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> bool:
    """A CPU call the kernel takes: few rows, contiguous weights, dtypes it reads."""
    if x.device.type != "cpu" or x.dim() != 2:
        return False
    if qweight.dtype != torch.int8 or x.dtype not in _DTYPE_CODES:
        return False
    if scale.dtype not in _DTYPE_CODES:
        return False
    if not (qweight.is_contiguous() and scale.is_contiguous()):
        return False
    native = serving_kernels()
    if native is None or not 1 <= x.shape[0] <= native.w8a16_max_rows:
        return False
    return x.shape[1] <= native.w8a16_max_k


def w4a16_gemv_supported(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int
) -> bool:
    """A CPU call the 4-bit kernel takes: any rows where it serves (the avx2 build), K and the
    group in multiples of 32 (one 16-byte load = 32 codes), group <= 256, contiguous buffers,
    dtypes it reads."""
    if x.device.type != "cpu" or x.dim() != 2 or x.dtype not in _DTYPE_CODES:
        return False
    if not w4a16_weight_supported(x.shape[1], qweight, scales, zeros, group):
        return False
    native = serving_kernels()
    return native is not None and native.w4a16_max_rows > 0 and x.shape[0] >= 1


def w4a16_weight_supported(
    k: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int
) -> bool:
    """A 4-bit weight of K inputs the kernel reads: K and the group in multiples of 32, group
    <= 256, contiguous CPU buffers of dtypes it knows."""
    if k % 32 or group % 32 or group > 256 or k % group or qweight.shape[1] * 2 != k:
        return False
    if qweight.dtype != torch.uint8 or scales.dtype not in _DTYPE_CODES:
        return False
    return zeros.dtype == scales.dtype and all(
        t.is_contiguous() and t.device.type == "cpu" for t in (qweight, scales, zeros)
    )


def decode_attention_supported(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
) -> bool:
    """CPU tensors of one dtype, bf16 or fp32: qkv rows [B, (H + 2 Hkv) * D] with unit column
    stride, contiguous layer caches [slots >= B, Hkv, max_len, D] with D % 16 == 0 and D at most
    the kernel's limit (256), a contiguous cos / sin table [max_len, D]."""
    tensors = (qkv, cos, k_cache, v_cache)
    if qkv.dtype not in STEP_OP_DTYPES:
        return False
    if any(t.device.type != "cpu" or t.dtype != qkv.dtype for t in tensors):
        return False
    if qkv.dim() != 2 or qkv.stride(1) != 1 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        return False
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and cos.is_contiguous()):
        return False
    slots, kv_heads, max_len, dim = k_cache.shape
    if dim % 16 or heads % kv_heads or qkv.shape[1] != (heads + 2 * kv_heads) * dim:
        return False
    if qkv.shape[0] > slots or cos.shape != (max_len, dim):
        return False
    native = kernels()
    return native is not None and dim <= native.decode_attention_max_head_dim


def quantize_rows_supported(x: torch.Tensor) -> bool:
    """W8A8 activations the native quantizer reads: 2-D CPU rows of a dtype it knows, unit
    column stride."""
    if x.device.type != "cpu" or x.dim() != 2 or x.dtype not in _DTYPE_CODES:
        return False
    return x.stride(1) == 1 and serving_kernels() is not None


def w8a8_gemm_supported(x: torch.Tensor, in_features: int, any_rows: bool = False) -> bool:
    """Few rows: up to the kernel's 32 (the engine's default decode batch), where it beat
    oneDNN's GEMM per call on this model's layers and on 4096x4096 (kernels/README.md); every
    row count with `any_rows` (where oneDNN's int8 GEMM is not exact)."""
    if not quantize_rows_supported(x) or x.shape[1] != in_features:
        return False
    native = kernels()  # it serves now: quantize_rows_supported checked
    rows_ok = x.shape[0] >= 1 and (any_rows or x.shape[0] <= native.w8a8_gemm_max_rows)
    return rows_ok and in_features <= native.w8a8_gemm_max_k


def w8a16_gemm_packs(qweight: torch.Tensor) -> NativeKernels | None:
    """The library that packs and serves this int8 CPU weight [N, K] from now on, or None: the
    avx2 build, or K past the int32 limit. A packed weight has no other reader, so the packed
    module calls it whatever torch's thread count."""
    native = kernels()
    if native is None or not native.w8a16_gemm_available or qweight.device.type != "cpu":
        return None
    return native if qweight.shape[1] <= native.w8a16_gemm_max_k else None


def w8a16_panels_packs(qweight: torch.Tensor, compute_dtype: torch.dtype) -> NativeKernels | None:
    """The library that packs and serves this int8 CPU weight [N, K] in the fp32 GEMM's panels
    from now on, or None: at the avx2 level (`f32_gemm_only_copy`), fp32 activations."""
    native = kernels()
    if native is None or not native.f32_gemm_only_copy or compute_dtype != torch.float32:
        return None
    return native if qweight.device.type == "cpu" and qweight.dtype == torch.int8 else None


def sparse24_packs(values: torch.Tensor) -> NativeKernels | None:
    """The library that packs and serves this 2:4 CPU weight (kept values [N, K/2]) from now
    on, or None: fp32 in either build, bf16 where the CPU has AVX-512 BF16. A packed weight has
    no other reader, so the packed module calls it whatever torch's thread count."""
    native = kernels()
    if native is None or values.device.type != "cpu" or values.dtype not in SPARSE24_BLOCKS:
        return None
    # The bf16 2:4 kernel needs what the bf16 GEMM needs: AVX-512 BF16, the avx512 build.
    if values.dtype == torch.bfloat16 and not native.bf16_gemm_available:
        return None
    return native


def argmax_rows_supported(logits: torch.Tensor) -> bool:
    """fp32 CPU rows [R, V >= 1] with unit column stride, while our kernels serve."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.shape[1] >= 1
        and logits.stride(1) == 1
        and serving_kernels() is not None
    )


def is_bf16_exact(weight: torch.Tensor) -> bool:
    """Whether every value of an fp32 tensor is a bf16 number (its low 16 bits zero)."""
    return weight.dtype == torch.float32 and not bool(
        (weight.contiguous().view(torch.int32) & 0xFFFF).any()
    )


def bf16_high_halves(values: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor whose values are all bf16 numbers (`is_bf16_exact`) as bf16, bit for bit:
    the high half of each value, NaN payloads and signed zeros included."""
    return (values.contiguous().view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def f32_gemm_supported(x: torch.Tensor, in_features: int) -> bool:
    """fp32 CPU rows [M <= 4, K] with unit column stride, while our kernels serve (beside
    oneDNN's copy of the weight)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return False
    if x.shape[1] != in_features or x.stride(1) != 1:
        return False
    native = serving_kernels()
    return native is not None and 1 <= x.shape[0] <= native.f32_gemm_max_rows
