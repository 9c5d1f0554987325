"""What a variant measures about itself at startup: FLOP model, device peak, self-benchmark.

Engine "torch" is benchmarked in the constructor, on a private event loop (its engine hands
events to whichever loop asked: `serves_any_loop`). vLLM's AsyncLLM is bound to the event loop
that serves it, so its variant is benchmarked on that loop instead, as soon as the replica
serves (`run_deferred_self_bench`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from pydantic import BaseModel

from slimserve.models.store import resolve_model, torch_dtype

from ..config import SlimserveConfig
from ..engine.protocol import Engine
from ..observability.flops import FlopModel, count_engine_flops, count_model_flops
from ..observability.measurements import measurement_key, recall, remember
from ..observability.peak import DevicePeak, device_peak
from .self_bench import SelfBenchResult, run_self_bench, run_self_bench_blocking

log = logging.getLogger(__name__)


class VariantBench(BaseModel):
    flops: FlopModel  # what runs, after compression
    flops_uncompressed: FlopModel  # the checkpoint as it is
    peak: DevicePeak
    self_bench: SelfBenchResult | None = None
    self_bench_pending: bool = False  # to run on the serving event loop (engine "vllm")
    seconds: float = 0.0


def checkpoint_flops(model_name: str) -> FlopModel:
    """The FLOP model of a checkpoint from its config alone (meta device, no weights read)."""
    from transformers import AutoConfig

    from slimserve.models.loading import causal_lm_from_config

    config = AutoConfig.from_pretrained(resolve_model(model_name))
    with torch.device("meta"):
        skeleton = causal_lm_from_config(config)
    return count_model_flops(skeleton)


def bench_variant(
    engine: Engine, tokenizer: Any, cfg: SlimserveConfig, variant: str
) -> VariantBench:
    """Run on a started engine, before it serves."""
    started = time.perf_counter()
    options = cfg.engine_for(variant)
    uncompressed = checkpoint_flops(cfg.model_for(variant))
    flops = count_engine_flops(engine) or uncompressed  # vLLM: quantized math costs the same
    peak = device_peak(
        torch_dtype(options.dtype), cfg.mfu.peak_flops_per_second, cfg.mfu.benchmark_seconds
    )
    result = _recalled_self_bench(cfg, variant) if cfg.self_bench.enabled else None
    on_own_loop = engine.serves_any_loop
    if cfg.self_bench.enabled and on_own_loop and result is None:
        result = run_self_bench_blocking(
            engine, tokenizer, cfg.self_bench, options.max_model_len, options.max_num_seqs
        )
        log.info("variant %s self-benchmark: %s", variant, result.model_dump())
        _remember_self_bench(cfg, variant, result)
    return VariantBench(
        flops=flops,
        flops_uncompressed=uncompressed,
        peak=peak,
        self_bench=result,
        self_bench_pending=cfg.self_bench.enabled and result is None,
        seconds=round(time.perf_counter() - started, 3),
    )


async def run_deferred_self_bench(
    bench: VariantBench, engine: Engine, tokenizer: Any, cfg: SlimserveConfig, variant: str
) -> None:
    """The self-benchmark on the current (serving) event loop; fills in `bench`."""
    options = cfg.engine_for(variant)
    started = time.perf_counter()
    try:
        result = await run_self_bench(
            engine, tokenizer, cfg.self_bench, options.max_model_len, options.max_num_seqs
        )
    except Exception as error:
        log.exception("variant %s self-benchmark failed", variant)
        result = SelfBenchResult(text=cfg.self_bench.text, unavailable=[f"failed: {error}"])
    bench.self_bench = result
    bench.self_bench_pending = False
    if not any(reason.startswith("failed") for reason in result.unavailable):
        _remember_self_bench(cfg, variant, result)
    bench.seconds = round(bench.seconds + time.perf_counter() - started, 3)
    log.info("variant %s self-benchmark: %s", variant, result.model_dump())


def _self_bench_key(cfg: SlimserveConfig, variant: str) -> str | None:
    """What the self-benchmark's figures depend on: the variant's weights (the compressed
    artifact's key), its engine options, the benchmark's own options and this machine. None
    for a model without local weights to fingerprint (it is measured every start)."""
    from slimserve.compression.artifact_cache import compression_key
    from slimserve.compression.artifact_store import UncacheableError

    options = cfg.engine_for(variant)
    try:
        weights = compression_key(
            cfg.model_for(variant), cfg.variants[variant].compression, options.dtype
        )
    except UncacheableError:
        return None
    inputs = {
        "weights": weights,
        "engine": options.model_dump(mode="json"),
        "self_bench": cfg.self_bench.model_dump(mode="json"),
    }
    return measurement_key("self-bench", inputs)


def _recalled_self_bench(cfg: SlimserveConfig, variant: str) -> SelfBenchResult | None:
    key = _self_bench_key(cfg, variant)
    stored = recall(key) if key else None
    if stored is None:
        return None
    try:
        result = SelfBenchResult.model_validate(stored)
    except ValueError:
        return None
    log.info("variant %s self-benchmark measured before on this machine: reused", variant)
    return result


def _remember_self_bench(cfg: SlimserveConfig, variant: str, result: SelfBenchResult) -> None:
    key = _self_bench_key(cfg, variant)
    if key:
        remember(key, result.model_dump(mode="json"))
