"""Building and loading slimserve's native CPU kernels, and forcing lower ISA levels, in fresh
processes: a failed build is reported and torch's kernels run; the variable that switches them
off; replicas building at once share one library; SLIMSERVE_CPU_ISA refuses what the CPU lacks;
and W8A8 stays exact where oneDNN's int8 GEMMs saturate, reproduced here with
ONEDNN_MAX_CPU_ISA=AVX2 (what an AVX2-only CPU such as AMD Zen 2 gives)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slimserve.kernels import cpu_isa

from .helpers import cpu_has


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, with `env` over this one's (a value of "" unsets)."""
    merged = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={name: value for name, value in merged.items() if value != ""},
        timeout=120,
        check=False,
    )


PROBE = """
    import logging, torch
    torch.set_num_threads(1)  # our kernels serve one-thread engines
    logging.basicConfig(level=logging.INFO)
    from slimserve.kernels import native
    from slimserve.kernels.int8 import select_w8a16_backend
    q = torch.zeros(16, 64, dtype=torch.int8)
    s = torch.ones(16, dtype=torch.bfloat16)
    print("backend", select_w8a16_backend(torch.ones(1, 64, dtype=torch.bfloat16), q, s))
    loaded = native.kernels()
    print("loaded", "nothing" if loaded is None else loaded.isa.label)
"""


def test_a_failed_build_is_reported_and_torch_kernels_run(tmp_path: Path) -> None:
    """Fault injected on purpose: a "compiler" that always fails (`false`)."""
    result = _run(PROBE, CXX="false", SLIMSERVE_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "backend cpu-int8pack" in result.stdout
    assert "native CPU kernels unavailable" in result.stderr
    assert "false failed on cpu_gemv.cpp cpu_decode_attention.cpp" in result.stderr


def test_switched_off_by_environment() -> None:
    result = _run(PROBE, SLIMSERVE_NATIVE_KERNELS="0")
    assert "backend cpu-int8pack" in result.stdout
    assert "disabled by SLIMSERVE_NATIVE_KERNELS=0" in result.stderr


def test_replicas_building_at_once_all_load_one_library(tmp_path: Path) -> None:
    code = PROBE + "\n    print('built', native.build())\n"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "SLIMSERVE_CACHE": str(tmp_path)},
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    level = cpu_isa.active().label
    assert all(f"loaded {level}" in out for out, _ in outputs), outputs
    built = {line for out, _ in outputs for line in out.splitlines() if line.startswith("built")}
    assert len(built) == 1, built  # one library, the same path in every process
    assert len(list((tmp_path / "native").rglob("*.so"))) == 1


# What an AVX2-only machine's libraries do, on any machine: oneDNN and ATen capped at AVX2.
AVX2_MACHINE = {
    "SLIMSERVE_CPU_ISA": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}

# Worst case for 16-bit pair sums: activations at the int8 extremes (each row's largest value
# is its scale, so codes are +-127), weights of one sign at the extremes; against int64 sums
# with fp32 scaling: a saturated sum is off by ~1e-1 relative, an exact one only by the rounding
# of the two fp32 products that scale it (a few 1e-8). Prints one line per row count.
W8A8_WORST_CASE = """
    import logging, torch
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    from slimserve.kernels import cpu_isa, cpu_paths
    from slimserve.kernels.dispatch import chosen_backends
    from slimserve.kernels.w8a8 import W8A8Linear
    print("isa", cpu_isa.active().label, "onednn-exact:", cpu_paths.int8_gemms_exact())
    n, k = 40, 576
    qweight = torch.full((n, k), 127, dtype=torch.int8)
    qweight[n // 2 :] = -128
    wscale = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 1e-2 + 1e-3
    module = W8A8Linear.from_quantized(qweight, wscale, None, torch.float32)
    module.pack_for_cpu()
    for rows in (1, 17, 32, 40, 100):
        x = torch.ones(rows, k)
        x[1::2] = -1.0
        x[2::3, ::2] *= -1.0
        scale = torch.full((rows, 1), 1.0 / 127)  # max |x| / 127, as the quantizer computes it
        codes = torch.round(x / scale).long()
        exact = (codes @ qweight.long().t()).float()
        expected = exact * wscale * scale
        out = module(x)
        error = float((out - expected).abs().max() / expected.abs().max())
        print("rows", rows, "exact", error < 1e-6, "max-rel", error)
    print("backends", chosen_backends()["w8a8"])
"""


def _worst_case(**env: str) -> str:
    result = _run(W8A8_WORST_CASE, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(not cpu_has("avx2", "fma", "f16c"), reason="this CPU has no AVX2 + FMA + F16C")
def test_w8a8_is_exact_where_onednn_saturates() -> None:
    out = _worst_case(**AVX2_MACHINE)
    # The regime is real: oneDNN's own int8 GEMM is caught saturating by the probe ...
    assert "isa avx2 onednn-exact: False" in out
    # ... and every row count is exact on our AVX2 build instead, never on oneDNN.
    assert out.count("exact True") == 5, out
    assert "backends ['cpu-native-gemm']" in out


def test_w8a8_is_exact_without_native_kernels_where_onednn_saturates() -> None:
    out = _worst_case(**AVX2_MACHINE, SLIMSERVE_NATIVE_KERNELS="0")
    assert "onednn-exact: False" in out
    assert out.count("exact True") == 5, out
    assert "backends ['reference']" in out


def test_w8a8_worst_case_is_exact_at_the_cpus_own_level() -> None:
    out = _worst_case(**dict.fromkeys(AVX2_MACHINE, ""))  # nothing capped
    assert out.count("exact True") == 5, out
    vnni = cpu_has("avx512_vnni") or cpu_has("avx_vnni") or cpu_has("amx_int8")
    assert f"onednn-exact: {vnni}" in out  # the probe agrees with the CPU's flags


def test_an_unknown_or_unavailable_isa_is_refused_by_name() -> None:
    code = "from slimserve.kernels import cpu_isa; cpu_isa.active()"
    result = _run(code, SLIMSERVE_CPU_ISA="avx9")
    assert result.returncode != 0
    assert "SLIMSERVE_CPU_ISA='avx9' is not an ISA level; use one of: none, avx2, avx512" in (
        result.stderr
    )
    if not cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_vnni"):
        result = _run(code, SLIMSERVE_CPU_ISA="avx512")
        assert "asks for more than this CPU executes" in result.stderr


def test_level_none_runs_torchs_kernels() -> None:
    result = _run(PROBE, SLIMSERVE_CPU_ISA="none")
    assert result.returncode == 0, result.stderr
    assert "backend cpu-int8pack" in result.stdout
    assert "at ISA level none" in result.stderr
