"""Where a decode step's time goes, per kernel, against the bandwidth floor of its bytes.

    python -m slimserve.loadtests.decode_profile --variants full int8 w8a8 --batch 1 8 32
        [--dtype auto|float32|bfloat16] [--steps N]

Per variant, the default model is compressed in-process and served by the engine's runner
(`LlamaRunner`, projections fused and dense ones prepacked as the engine builds it) on one torch
thread. At each batch, `batch` slots hold the same prompt; at each position a decode step
(forward + greedy choice, as the engine samples) runs plain as the engine runs it (every layer
in one native call where the model allows: kernels/decode_step.py), plain again with one call
per kernel, then per kernel with timers around every matmul module, the ops between them
(residual add + RMSNorm, rotary + KV write + attention, SiLU * up), the embedding lookup and
the greedy choice: alternating, so load from other work on the machine hits all three alike.
Timers count exclusive CPU time of the decoding thread (a region less the regions timed inside
it), which other processes competing for the cores leave mostly unchanged; each region's time
is less the timers' own cost inside a region (measured on an empty region), and the rest of a
step (the per-call plain step's CPU time less the timed parts) is Python and scheduling. Our
native kernels run through ctypes, unseen by torch.profiler, so the timers wrap the runner's
callables from outside, and the backend of each matmul call is read from `record_backend`.

The floor: the bytes a step must read (every weight once, the KV cache up to each sequence's
position) over this machine's single-thread read bandwidth, measured here as the best of several
sums of a float32 tensor far larger than the caches; a step's share of it is taken on CPU time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter
from torch import nn

from slimserve.compression.evaluation import evaluation_ids
from slimserve.compression.registry import apply_compression
from slimserve.compression.report import resident_weight_bytes
from slimserve.compression.specs import CompressionSpec
from slimserve.kernels import cpu_isa, dense_cpu, dispatch, native, w8a8
from slimserve.kernels import int8 as w8a16
from slimserve.kernels.dense_cpu import PackedLinear
from slimserve.kernels.lowbit import LowBitLinear
from slimserve.kernels.sparse24 import SparseLinear
from slimserve.kernels.w8a8 import W8A8Linear
from slimserve.models.llama_runner import LlamaRunner
from slimserve.models.store import DEFAULT_MODEL_ALIAS, load_model_and_tokenizer
from slimserve.serve.config import EngineOptions
from slimserve.serve.engine.sampling import sample_tokens
from slimserve.serve.engine.types import SamplingParams
from slimserve.serve.logs import configure_logging

log = logging.getLogger("slimserve.loadtests.decode_profile")

VARIANTS: dict[str, list[dict[str, Any]]] = {
    "full": [],
    "int8": [{"method": "int8-weight-only"}],
    "w8a8": [{"method": "smoothquant-w8a8"}],
    # deploy/configs/compressed.yaml's: Q4_1-like groups, the tied embedding / lm_head in int8.
    "w4": [
        {"method": "rtn", "bits": 4, "group_size": 32, "zero_point": "float"},
        {"method": "int8-weight-only"},
    ],
    # Magnitude, not Wanda: the same 2:4 layout and kernels, without a calibration pass.
    "sparse24": [{"method": "magnitude", "sparsity": "2:4"}],
}
MATMUL_KINDS = ("qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down")
GROUPS = ("matmul", "attention", "rotary", "norm", "silu", "embedding", "sampling", "rest")
WARMUP_STEPS = 2
BANDWIDTH_MIB = 512


@dataclass(frozen=True)
class Op:
    """A line of the breakdown: a group of `GROUPS`, and for matmuls the shape and backend."""

    group: str
    name: str
    shape: str = ""
    backend: str = ""

    def sort_key(self) -> tuple[int, int, str, str]:
        kinds = (*MATMUL_KINDS, "lm_head")
        kind = kinds.index(self.name) if self.name in kinds else 0
        return GROUPS.index(self.group), kind, self.name, self.backend


REST = Op("rest", "Python, scheduling (per-call step - timed)")


class StepTimer:
    """Exclusive CPU seconds of this thread and calls per op: a region's time less the regions
    timed inside it."""

    def __init__(self) -> None:
        self.seconds: dict[Op, float] = defaultdict(float)
        self.calls: dict[Op, int] = defaultdict(int)
        self._inner: list[float] = []  # per open region, the time of the regions inside it

    def timed(self, fn: Callable[..., Any], op: Callable[[], Op]) -> Callable[..., Any]:
        """`fn`, timed under `op()` (asked after the call, so it can name the backend used)."""

        def run(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.thread_time() - started
                key = op()
                self.seconds[key] += elapsed - self._inner.pop()
                self.calls[key] += 1
                if self._inner:
                    self._inner[-1] += elapsed

        return run

    def in_region_cost(self, calls: int = 20_000) -> float:
        """CPU seconds a timer adds inside the region it times, per call: an empty region's."""
        empty, probe = StepTimer(), Op("probe", "empty")
        run = empty.timed(lambda: None, lambda: probe)
        for _ in range(calls):
            run()
        return empty.seconds[probe] / calls


class TimedCall:
    """Stands for a module or callable: calls are timed, attributes read through (the native
    step reads a norm's weight and epsilon without calling it)."""

    def __init__(self, target: Callable[..., Any], timer: StepTimer, op: Callable[[], Op]) -> None:
        self._call = timer.timed(target, op)
        self._target = target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class BackendTap:
    """The backend of the last matmul call, seen through `record_backend` in the kernel modules
    that call it (still recorded as usual)."""

    modules = (dense_cpu, w8a16, w8a8)

    def __init__(self) -> None:
        self.last: str | None = None

    def _record(self, op: str, backend: str) -> None:
        self.last = backend
        dispatch.record_backend(op, backend)

    def take(self) -> str | None:
        last, self.last = self.last, None
        return last

    @contextmanager
    def watching(self) -> Iterator[BackendTap]:
        for module in self.modules:
            module.record_backend = self._record
        try:
            yield self
        finally:
            for module in self.modules:
                module.record_backend = dispatch.record_backend


@dataclass
class StepTimes:
    wall: list[float] = field(default_factory=list)  # seconds per step
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this thread per step


@dataclass
class BatchProfile:
    batch: int
    plain: StepTimes  # no timers, as the engine steps (in one call where it can)
    per_call: StepTimes  # no timers, one Python call per kernel
    timed: StepTimes  # per kernel, with timers
    timer: StepTimer
    timer_cost: float  # CPU seconds a timer adds inside each region it times
    weight_bytes: int  # per step: every weight once
    kv_bytes: float  # per step, mean over the timed steps
    matmul_bytes: dict[Op, int]  # per call

    @property
    def steps(self) -> int:
        return len(self.timed.cpu)

    def ms_per_step(self) -> dict[Op, float]:
        """Exclusive CPU ms per step by op (less the timers' cost), and the rest of the per-call
        step."""
        per_step = {
            op: 1e3 * (s - self.timer.calls[op] * self.timer_cost) / self.steps
            for op, s in self.timer.seconds.items()
        }
        per_step[REST] = 1e3 * statistics.fmean(self.per_call.cpu) - sum(per_step.values())
        return per_step

    def floor_ms(self, op: Op, bandwidth: float) -> float | None:
        """The ms per step reading the op's bytes once takes; None for ops with no bytes of
        their own to read."""
        if op.group == "attention":
            return 1e3 * self.kv_bytes / bandwidth
        if op in self.matmul_bytes:
            calls = self.timer.calls[op] / self.steps
            return 1e3 * self.matmul_bytes[op] * calls / bandwidth
        return None


@dataclass
class VariantProfile:
    name: str
    dtype: str
    batches: list[BatchProfile]


def read_bandwidth(mib: int = BANDWIDTH_MIB, repeats: int = 7) -> float:
    """Bytes per second one thread reads from memory: the best of `repeats` sums of a float32
    tensor of `mib` MiB (far larger than the caches)."""
    data = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * data.element_size() / best


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_dtype(name: str) -> str:
    """`auto` as the engine resolves it (bfloat16 where the active ISA computes it natively)."""
    return EngineOptions(dtype=name).resolved().dtype


def compress(reference: nn.Module, variant: str) -> nn.Module:
    """A fresh copy of `reference`, compressed as the variant says."""
    model = copy.deepcopy(reference)
    specs = TypeAdapter(list[CompressionSpec]).validate_python(VARIANTS[variant])
    if not specs:
        return model
    for spec in specs:
        spec.check_model(model.config)
    report = apply_compression(model, specs)
    log.info("%s: %s", variant, report.summary())
    return model


def weights_read_per_step(runner: LlamaRunner) -> int:
    """Every projection's weight a decode step reads, once, as the runner holds it (packed: an
    fp32 weight kept in bf16 reads half its bytes), the lm_head included (a tied embedding
    counts once: the head reads it whole, the lookup a few rows). The norms' weights (under
    0.1 MB on the default model) are left out."""
    return sum(matmul_read_bytes(getattr(owner, name)) for owner, name in _matmul_modules(runner))


def matmul_read_bytes(module: nn.Module) -> int:
    """Bytes one call of a (fused, packed) projection reads: its weight and per-channel
    vectors. Packed modules hold their weight outside parameters and buffers."""
    if isinstance(module, PackedLinear):
        bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
        return module.packed_bytes + bias
    if isinstance(module, W8A8Linear):
        return _int8_read_bytes(module, module.weight_scale)
    if isinstance(module, w8a16.Int8Linear) and module.cpu_native_pack is not None:
        return _int8_read_bytes(module, module.scale)
    if isinstance(module, SparseLinear) and module.cpu_values is not None:
        parts = (module.cpu_values, module.cpu_codes, module.bias)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)
    if isinstance(module, LowBitLinear):  # the codes our GEMV reads, not int4pack's copy too
        parts = (module.qweight, module.qweight_hi, module.scales, module.zeros, module.bias)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)
    return resident_weight_bytes(module)


def _int8_read_bytes(module: W8A8Linear | w8a16.Int8Linear, scale: torch.Tensor) -> int:
    """An int8 weight in a packed layout, its per-channel scale and bias."""
    vectors = [scale] + ([] if module.bias is None else [module.bias])
    weight = module.out_features * module.in_features
    return weight + sum(v.numel() * v.element_size() for v in vectors)


def kv_bytes_read(runner: LlamaRunner, batch: int, positions: range) -> float:
    """K and V bytes a step reads, mean over `positions`: every layer's cache of each sequence
    up to and including its position."""
    per_key = 2 * len(runner.layers) * runner.n_kv_heads * runner.head_dim
    per_key *= runner.k_cache.element_size()
    return per_key * batch * statistics.fmean(p + 1 for p in positions)


def _matmul_op(
    kind: str, module: nn.Module, tap: BackendTap, sizes: dict[Op, int]
) -> Callable[[], Op]:
    """The op of a projection's call, named after the backend that ran it; records the bytes
    one call reads."""
    shape = f"{module.out_features} x {module.in_features}"
    size = matmul_read_bytes(module)

    def op() -> Op:
        key = Op("matmul", kind, shape, tap.take() or type(module).__name__)
        sizes[key] = size
        return key

    return op


def _fixed(op: Op) -> Callable[[], Op]:
    return lambda: op


def _matmul_modules(runner: LlamaRunner) -> list[tuple[Any, str]]:
    """(owner, attribute) of every projection a decode step calls."""
    found: list[tuple[Any, str]] = [(runner, "lm_head")]
    for plan in runner.layers:
        modules = {kind: getattr(plan, kind, None) for kind in MATMUL_KINDS}
        found += [(plan, kind) for kind, m in modules.items() if isinstance(m, nn.Module)]
    return found


@contextmanager
def per_call(runner: LlamaRunner) -> Iterator[None]:
    """The runner stepping one Python call per kernel while inside."""
    step, runner.native_step = runner.native_step, None
    try:
        yield
    finally:
        runner.native_step = step


@contextmanager
def instrumented(
    runner: LlamaRunner, timer: StepTimer, tap: BackendTap, sizes: dict[Op, int]
) -> Iterator[None]:
    """Timers on every projection and on the ops between them while inside; `sizes` gets the
    bytes one call of each matmul op reads, as the ops run."""
    attention = Op(
        "attention",
        "rotary + KV write + attention" if runner.native_decode else "KV write + attention",
    )
    norm = Op("norm", "residual add + RMSNorm")
    patched: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, replacement: Any) -> None:
        patched.append((owner, name, owner.__dict__.get(name)))  # None: a class attribute
        setattr(owner, name, replacement)

    def wrap_ops(ops: Any) -> Any:
        ops.add_norm = timer.timed(ops.add_norm, _fixed(norm))
        ops.finish = timer.timed(ops.finish, _fixed(norm))
        ops.attend_decode = timer.timed(ops.attend_decode, _fixed(attention))
        ops.gated = timer.timed(ops.gated, _fixed(Op("silu", "SiLU(gate) * up")))
        return ops

    for owner, kind in _matmul_modules(runner):
        module = getattr(owner, kind)
        patch(owner, kind, TimedCall(module, timer, _matmul_op(kind, module, tap, sizes)))
    step_ops = runner._step_ops
    patch(runner, "_step_ops", lambda *args: wrap_ops(step_ops(*args)))
    patch(runner, "_rotate_qkv", timer.timed(runner._rotate_qkv, _fixed(Op("rotary", "rotary"))))
    patch(runner, "final_norm", TimedCall(runner.final_norm, timer, _fixed(norm)))
    patch(runner, "embed", TimedCall(runner.embed, timer, _fixed(Op("embedding", "lookup"))))
    try:
        with tap.watching():
            yield
    finally:
        for owner, name, original in reversed(patched):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def decode_step(
    runner: LlamaRunner,
    batch: int,
    position: int,
    token: int,
    sample: Callable[[torch.Tensor], list[int]],
    times: StepTimes,
) -> None:
    """One decode step (forward + greedy choice) of `batch` sequences at `position`; its wall
    and CPU seconds go to `times`."""
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.thread_time()
        sample(runner.decode([token] * batch, [position] * batch))
        times.wall.append(time.perf_counter() - wall)
        times.cpu.append(time.thread_time() - cpu)


def greedy(batch: int) -> Callable[[torch.Tensor], list[int]]:
    params, generators = [SamplingParams(temperature=0)] * batch, [None] * batch
    return lambda logits: sample_tokens(logits, params, generators)


def profile_batch(
    runner: LlamaRunner, batch: int, prompt: list[int], steps: int, weight_bytes: int
) -> BatchProfile:
    """Warm-up steps, then at each position a plain step and the same step with timers.
    Slots 0..batch-1 already hold the prompt; both steps at a position read the same cache."""
    token, plain_sample = prompt[-1], greedy(batch)
    for position in range(len(prompt), len(prompt) + WARMUP_STEPS):
        decode_step(runner, batch, position, token, plain_sample, StepTimes())
    timer, tap = StepTimer(), BackendTap()
    matmul_bytes: dict[Op, int] = {}
    timed_sample = timer.timed(plain_sample, _fixed(Op("sampling", "greedy choice")))
    plain, per_call_plain, timed = StepTimes(), StepTimes(), StepTimes()
    positions = range(len(prompt), len(prompt) + steps)
    for position in positions:
        decode_step(runner, batch, position, token, plain_sample, plain)
        with per_call(runner):
            decode_step(runner, batch, position, token, plain_sample, per_call_plain)
        with per_call(runner), instrumented(runner, timer, tap, matmul_bytes):
            decode_step(runner, batch, position, token, timed_sample, timed)
    return BatchProfile(
        batch,
        plain,
        per_call_plain,
        timed,
        timer,
        timer.in_region_cost(),
        weight_bytes,
        kv_bytes_read(runner, batch, positions),
        matmul_bytes,
    )


def profile_variant(
    reference: nn.Module,
    variant: str,
    dtype: str,
    batches: list[int],
    prompt: list[int],
    steps: int,
) -> VariantProfile:
    model = compress(reference, variant)
    max_len = len(prompt) + max(steps, WARMUP_STEPS) + 8
    runner = LlamaRunner(model, max_slots=max(batches), max_len=max_len, pack_dense=True)
    weight_bytes = weights_read_per_step(runner)
    log.info("%s: %.1f MB of weights read per step, native decode ops: %s, one-call step: %s",
             variant, weight_bytes / 1e6, runner.native_decode,
             runner.native_step is not None)  # fmt: skip
    with torch.inference_mode():
        for slot in range(max(batches)):
            runner.prefill(slot, prompt, 0, want_logits=False)
    profiles = []
    for batch in batches:
        profiles.append(profile_batch(runner, batch, prompt, steps, weight_bytes))
        plain = profiles[-1].plain
        log.info("%s batch %d: %.2f ms/step (%.2f per call), %.2f CPU ms/step (medians), "
                 "load %s", variant, batch, 1e3 * statistics.median(plain.wall),
                 1e3 * statistics.median(profiles[-1].per_call.wall),
                 1e3 * statistics.median(plain.cpu), load_average())  # fmt: skip
    return VariantProfile(variant, dtype, profiles)


def _group_ms(per_step: dict[Op, float], groups: tuple[str, ...]) -> float:
    return sum(ms for op, ms in per_step.items() if op.group in groups)


def summary_table(variants: list[VariantProfile], bandwidth: float) -> str:
    lines = [
        "| variant | dtype | batch | weights MB | KV MB | floor tok/s | tok/CPU-s | of floor "
        "| tok/s wall | per-call tok/s wall | CPU ms/step | matmuls | attention "
        "| norms, SiLU, rotary | embed + sampling | rest | timers add |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        for p in variant.batches:
            floor = p.batch * bandwidth / (p.weight_bytes + p.kv_bytes)
            step_ms = 1e3 * statistics.median(p.plain.cpu)
            rate = 1e3 * p.batch / step_ms
            wall_rate = p.batch / statistics.median(p.plain.wall)
            per_step = p.ms_per_step()
            per_call_rate = p.batch / statistics.median(p.per_call.wall)
            timers_add = 1e3 * (statistics.fmean(p.timed.cpu) - statistics.fmean(p.per_call.cpu))
            cells = [
                variant.name,
                variant.dtype,
                str(p.batch),
                f"{p.weight_bytes / 1e6:.1f}",
                f"{p.kv_bytes / 1e6:.1f}",
                f"{floor:.1f}",
                f"{rate:.1f}",
                f"{rate / floor:.0%}",
                f"{wall_rate:.1f}",
                f"{per_call_rate:.1f}",
                f"{step_ms:.2f}",
                *(
                    f"{_group_ms(per_step, groups):.2f}"
                    for groups in (
                        ("matmul",),
                        ("attention",),
                        ("norm", "silu", "rotary"),
                        ("embedding", "sampling"),
                        ("rest",),
                    )
                ),
                f"{timers_add:+.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _op_cells(p: BatchProfile, op: Op, bandwidth: float) -> list[str]:
    ms = p.ms_per_step().get(op)
    if ms is None:
        return ["-", "-"]
    floor = p.floor_ms(op, bandwidth)
    return [f"{ms:.2f}", "-" if not floor else f"{ms / floor:.1f}x"]


def op_table(variants: list[VariantProfile], bandwidth: float) -> str:
    batches = [p.batch for p in variants[0].batches]  # every variant runs the same batches
    head = " | ".join(f"b{b} ms | b{b} x floor" for b in batches)
    lines = [
        f"| variant | op | N x K | backend | MB/call | {head} |",
        "|---|---|---|---|---:|" + "---:|" * (2 * len(batches)),
    ]
    for variant in variants:
        by_batch = {p.batch: p for p in variant.batches}
        ops = {op for p in variant.batches for op in p.ms_per_step()}
        sizes = {op: size for p in variant.batches for op, size in p.matmul_bytes.items()}
        for op in sorted(ops, key=Op.sort_key):
            size = f"{sizes[op] / 1e6:.2f}" if op in sizes else "-"
            cells = [variant.name, op.name, op.shape or "-", op.backend or "-", size]
            for batch in batches:
                cells += _op_cells(by_batch[batch], op, bandwidth)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gaps_table(variants: list[VariantProfile], bandwidth: float, top: int = 3) -> str:
    """Per variant and batch, the ops whose time is furthest above their own floor."""
    lines = [
        "| variant | batch | step CPU ms over floor | largest gaps (CPU ms over the op's floor) |",
        "|---|---:|---:|---|",
    ]
    for variant in variants:
        for p in variant.batches:
            gaps = {
                op: ms - (p.floor_ms(op, bandwidth) or 0.0) for op, ms in p.ms_per_step().items()
            }
            largest = sorted(gaps, key=gaps.__getitem__, reverse=True)[:top]
            floor_ms = 1e3 * (p.weight_bytes + p.kv_bytes) / bandwidth
            over = 1e3 * statistics.fmean(p.plain.cpu) - floor_ms
            named = ", ".join(
                f"{op.name}{' ' + op.shape if op.shape else ''} {gaps[op]:.2f}" for op in largest
            )
            lines.append(f"| {variant.name} | {p.batch} | {over:.2f} | {named} |")
    return "\n".join(lines)


def caption(args: argparse.Namespace, dtype: str, bandwidth: float, prompt_len: int) -> str:
    isa, now = cpu_isa.describe(), datetime.datetime.now(datetime.UTC)
    forced = {k: os.environ[k] for k in ("SLIMSERVE_CPU_ISA", "ONEDNN_MAX_CPU_ISA",
              "ATEN_CPU_CAPABILITY") if k in os.environ}  # fmt: skip
    return (
        f"{args.model}, {dtype}; CPU {cpu_name()} ({platform.machine()}), ISA level "
        f"{isa['isa']} (native bf16: {isa['native_bf16']}), forced: {forced or 'none'}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread, {args.kernel_threads} kernel "
        f"thread(s), {args.bf16_layout} bf16 layout; single-thread read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (best of 7 sums of {BANDWIDTH_MIB} MiB float32); "
        f"{prompt_len}-token prompt in every slot, {args.steps} decode steps per batch after "
        f"{WARMUP_STEPS} warm-up steps, each run plain and timed; {now:%Y-%m-%d %H:%M} UTC, load "
        f"average {load_average()}."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_ALIAS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="cached tokens per slot")
    parser.add_argument(
        "--kernel-threads",
        type=int,
        default=1,
        help="threads of our own matmul kernels (engine.kernel_threads; its default is every "
        "core); the op times are the decoding thread's, which waits for the others",
    )
    parser.add_argument(
        "--bf16-layout",
        choices=["coded", "plain"],
        default="coded",
        help="where our bf16 GEMM serves dense weights: the coded layout where it saves bytes "
        "(the engine's choice) or the plain one everywhere (to compare them)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    if args.bf16_layout == "plain":
        native.BF16_CODED_MAX_SHARE = 0.0
    torch.set_num_threads(1)  # the engine's default on 2 cores; our kernels serve only then
    if (kernels := native.kernels()) is not None:
        kernels.set_threads(args.kernel_threads)
    dtype = resolve_dtype(args.dtype)
    log.info("load average %s; dtype %s; %s", load_average(), dtype, cpu_isa.describe())
    bandwidth = read_bandwidth()
    log.info("single-thread read bandwidth %.1f GB/s", bandwidth / 1e9)
    reference, tokenizer = load_model_and_tokenizer(args.model, dtype)
    prompt = evaluation_ids(tokenizer, max_tokens=args.prompt_tokens)[0].tolist()
    variants = [
        profile_variant(reference, name, dtype, args.batch, prompt, args.steps)
        for name in args.variants
    ]
    print(summary_table(variants, bandwidth))
    print()
    print(op_table(variants, bandwidth))
    print()
    print(gaps_table(variants, bandwidth))
    print()
    print(caption(args, dtype, bandwidth, len(prompt)))


if __name__ == "__main__":
    main()
