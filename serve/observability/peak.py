"""The device's peak matmul FLOP/s, the denominator of MFU.

On a GPU: dense bf16 tensor-core peaks from the vendors' spec sheets (no sparsity), by device
name. On CPU: measured at startup with a short matmul benchmark in the model's dtype (the one
`engine.dtype` resolved to: bf16 only where the CPU has it natively, so an AVX2 CPU is not
measured on emulated bf16), on the engine's threads, the best of many short trials (the machine
may be shared; the best trial is the least disturbed one), at least MIN_TRIALS of them.
Replicas on one machine take turns (a file lock), so they do not measure each other. A config
value overrides both.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from filelock import FileLock
from pydantic import BaseModel

from slimserve.kernels import cpu_isa
from slimserve.models.paths import cache_root

from .measurements import measurement_key, recall, remember

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s (no 2:4 sparsity), longest matching name first.
GPU_BF16_PEAK: dict[str, float] = {
    "GB200": 2.5e15,
    "B200": 2.25e15,
    "GH200": 989e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16)
    "T4": 65e12,  # fp16 tensor cores (no bf16)
}

_MATMUL_SIZE = 1024
MIN_TRIALS = 3


class DevicePeak(BaseModel):
    flops_per_second: float
    source: str  # "config", "gpu-spec:<name>", "measured-cpu:<dtype>:<isa>"
    device: str


def gpu_peak_from_table(device_name: str) -> float | None:
    for key in sorted(GPU_BF16_PEAK, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return GPU_BF16_PEAK[key]
    return None


def _matmul_benchmark(dtype: torch.dtype, seconds: float, device: str, size: int) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    reps = 10 if device == "cuda" else 1  # a GPU matmul is too short to time alone
    for _ in range(2):
        torch.mm(a, b, out=out)
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    trials = 0
    while time.perf_counter() < deadline or trials < MIN_TRIALS:
        trials += 1
        started = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync()
        best = max(best, reps * 2 * size**3 / (time.perf_counter() - started))
    return best


@functools.lru_cache(maxsize=8)
def measure_peak(dtype: torch.dtype, seconds: float, device: str, threads: int) -> float:
    """Best matmul FLOP/s on `device` ("cpu" with `threads` threads, or "cuda"); cached per
    process and on disk (a restarted replica reuses it after a few fresh trials), one
    measurement at a time per machine."""
    key = measurement_key(
        "matmul-peak",
        {"dtype": str(dtype), "seconds": seconds, "device": device, "threads": threads},
    )
    stored = recall(key)
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    size = 4096 if device == "cuda" else _MATMUL_SIZE
    # A stored peak is the best seen so far; a few fresh trials (milliseconds) can only raise
    # it, so one taken on a busy machine does not stay low (and put MFU above 1) for good.
    budget = 0.0 if isinstance(stored, float) else seconds
    with FileLock(str(lock_dir / "peak-benchmark.lock"), timeout=120), torch.inference_mode():
        measured = _matmul_benchmark(dtype, budget, device, size)
    if isinstance(stored, float) and stored >= measured:
        log.info(
            "%s peak %.3g FLOP/s (%s, %d threads; measured before)", device, stored, dtype, threads
        )
        return stored
    log.info(
        "%s peak %.3g FLOP/s (%s, %d threads, best of %.1fs)",
        device,
        measured,
        dtype,
        threads,
        budget,
    )
    remember(key, measured)
    return measured


def device_peak(dtype: torch.dtype, override: float | None, seconds: float) -> DevicePeak:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        device = f"cuda:{name}"
    else:
        name, device = "", "cpu"
    if override is not None:
        return DevicePeak(flops_per_second=override, source="config", device=device)
    if name:
        table = gpu_peak_from_table(name)
        if table is not None:
            return DevicePeak(flops_per_second=table, source=f"gpu-spec:{name}", device=device)
        log.warning("GPU %r is not in the peak table; measuring its matmul peak", name)
    kind = "cuda" if name else "cpu"
    peak = measure_peak(dtype, seconds, kind, torch.get_num_threads())
    source = f"measured-{kind}:{str(dtype).removeprefix('torch.')}"
    if kind == "cpu":
        source += f":{cpu_isa.active().label}"
    return DevicePeak(flops_per_second=peak, source=source, device=device)
