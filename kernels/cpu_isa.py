"""Which x86 instruction set slimserve's own CPU kernels use here, chosen at run time.

Levels, lowest first: `none` (no native kernels: torch's own CPU kernels run), `avx2` (AVX2 +
FMA + F16C: AMD Zen 2 and every x86 server CPU since 2013), `avx512` (AVX-512 F / BW / VL /
VNNI: Intel Ice Lake / Sapphire Rapids, AMD Zen 4 / 5). The detected level is the highest this
CPU executes; `SLIMSERVE_CPU_ISA` forces a lower one (never a higher one), so the lower paths
run and are tested on every machine. Extras that change what runs best: native bf16
(AVX512_BF16 or AMX-BF16) and AMX tiles, used through oneDNN and by our bf16 and W8A16 GEMMs;
`SLIMSERVE_CPU_AMX=0` keeps our kernels off the tiles, so their AVX-512 paths run on AMX CPUs too.

Pure Python (it reads /proc/cpuinfo): the gateway, which never imports torch, can call it.
"""

from __future__ import annotations

import enum
import functools
import os
from pathlib import Path

ISA_ENV = "SLIMSERVE_CPU_ISA"
AMX_ENV = "SLIMSERVE_CPU_AMX"


class Isa(enum.IntEnum):
    NONE = 0
    AVX2 = 1
    AVX512 = 2

    @property
    def label(self) -> str:
        return self.name.lower()


# The /proc/cpuinfo flags each level needs (the kernels are compiled for exactly these).
ISA_FLAGS: dict[Isa, tuple[str, ...]] = {
    Isa.NONE: (),
    Isa.AVX2: ("avx2", "fma", "f16c"),
    Isa.AVX512: ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return frozenset()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def parse_isa(name: str) -> Isa:
    try:
        return Isa[name.strip().upper()]
    except KeyError:
        known = ", ".join(level.label for level in Isa)
        raise ValueError(f"{ISA_ENV}={name!r} is not an ISA level; use one of: {known}") from None


def detected() -> Isa:
    """The highest level this CPU executes."""
    flags = cpu_flags()
    return max(level for level in Isa if all(flag in flags for flag in ISA_FLAGS[level]))


@functools.cache
def active() -> Isa:
    """The level the kernels use: the detected one, or lower where `SLIMSERVE_CPU_ISA` says.
    Cached: tests that change the variable call `active.cache_clear()`."""
    found = detected()
    forced = os.environ.get(ISA_ENV)
    if not forced:
        return found
    wanted = parse_isa(forced)
    if wanted > found:
        raise ValueError(
            f"{ISA_ENV}={forced} asks for more than this CPU executes ({found.label}: flags "
            f"{', '.join(f for f in ISA_FLAGS[wanted] if f not in cpu_flags())} are missing)"
        )
    return wanted


def runnable() -> list[Isa]:
    """Every level with native kernels that this CPU executes, lowest first (tests run each)."""
    return [level for level in Isa if Isa.NONE < level <= detected()]


def has_native_bf16() -> bool:
    """bf16 matmuls in hardware (AVX512_BF16 dot products or AMX tiles) at the active level; on
    AVX2 alone torch and vLLM emulate bf16 several times slower than fp32."""
    return active() >= Isa.AVX512 and any(flag in cpu_flags() for flag in BF16_FLAGS)


def has_amx() -> bool:
    """AMX-BF16 tiles at the active level, unless `SLIMSERVE_CPU_AMX=0` turns them off for our
    kernels (oneDNN's own switch is ONEDNN_MAX_CPU_ISA)."""
    if os.environ.get(AMX_ENV, "1") == "0":
        return False
    return active() >= Isa.AVX512 and all(flag in cpu_flags() for flag in AMX_FLAGS)


def default_dtype() -> str:
    """What `engine.dtype: auto` computes in on this CPU."""
    return "bfloat16" if has_native_bf16() else "float32"


def describe() -> dict[str, str | bool]:
    """For logs, stats and metric labels."""
    return {
        "isa": active().label,
        "detected_isa": detected().label,
        "native_bf16": has_native_bf16(),
        "amx": has_amx(),
    }
