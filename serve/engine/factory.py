"""Build a variant's engine from the config: load, compress, and (for vLLM) export."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from transformers import AutoTokenizer

from slimserve.compression import CompressionReport, apply_compression
from slimserve.models.store import (
    cache_root,
    checkpoint_weight_bytes,
    load_model_and_tokenizer,
    resolve_model,
)

from ..config import SlimserveConfig
from .limits import EngineLimits
from .torch_engine import TorchEngine
from .vllm_engine import VllmEngine

log = logging.getLogger(__name__)


@dataclass
class BuiltEngine:
    engine: Any  # TorchEngine, EngineProcess or VllmEngine
    tokenizer: Any
    report: CompressionReport
    load_seconds: float
    compress_seconds: float
    # torch engine: "hit" (compressed artifact loaded), "miss" (compressed now), "rebuilt"
    # (a corrupt or stale artifact was replaced); vllm: "export-hit" / "export-miss"
    cache_status: str = "miss"


def _limits(cfg: SlimserveConfig, variant: str) -> EngineLimits:
    options = cfg.engine_for(variant)
    return EngineLimits(
        max_num_seqs=options.max_num_seqs,
        max_model_len=options.max_model_len,
        max_queued_requests=options.max_queued_requests,
        prefill_chunk_tokens=options.prefill_chunk_tokens,
        prefix_cache_slots=options.prefix_cache_slots,
    )


def _export_key(model_path: str, specs: list[dict], dtype: str) -> str:
    import compressed_tensors
    import torch
    import transformers

    weights = sorted(Path(model_path).glob("*.safetensors"))
    fingerprint = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    blob = json.dumps(
        {
            "model": str(Path(model_path).resolve()),
            "weights": fingerprint,
            "specs": specs,
            "dtype": dtype,
            "versions": [
                torch.__version__,
                transformers.__version__,
                compressed_tensors.__version__,
            ],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _compressed_checkpoint(
    cfg: SlimserveConfig, variant: str
) -> tuple[str, Any, CompressionReport, float, float]:
    """Compress and export for vLLM once; later starts reuse the export."""
    from .vllm_export import export_for_vllm

    options = cfg.engine_for(variant)
    model_path = resolve_model(cfg.model_for(variant))
    specs = [spec.model_dump(mode="json") for spec in cfg.variants[variant].compression]
    target = cache_root() / "vllm-exports" / _export_key(model_path, specs, options.dtype)
    report_path = target / "slimserve-report.json"
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if report_path.is_file():
            log.info("variant %s: reusing the vLLM export at %s", variant, target)
            report = CompressionReport.model_validate_json(report_path.read_text())
            tokenizer = AutoTokenizer.from_pretrained(target)
            return str(target), tokenizer, report, time.perf_counter() - started, 0.0
        model, tokenizer = load_model_and_tokenizer(model_path, options.dtype)
        loaded = time.perf_counter()
        report = apply_compression(model, cfg.variants[variant].compression)
        export_for_vllm(model, tokenizer, target)
        report.weight_bytes_after = checkpoint_weight_bytes(str(target))
        # Written last: its presence marks a complete export.
        report_path.write_text(report.model_dump_json())
        return str(target), tokenizer, report, loaded - started, time.perf_counter() - loaded


# Compression at startup (GPTQ on a large model) can take long; a hung child must still fail.
ENGINE_START_TIMEOUT_S = 3600.0


def build_torch_engine(cfg: SlimserveConfig, variant: str) -> BuiltEngine:
    """Load (or compress) the variant and wrap it in an in-process TorchEngine (not started)."""
    from slimserve.compression.artifact_cache import load_or_compress

    started = time.perf_counter()
    model, tokenizer, report, cache_status = load_or_compress(
        cfg.model_for(variant), cfg.variants[variant].compression, cfg.engine_for(variant).dtype
    )
    total = time.perf_counter() - started
    compress_s = 0.0 if cache_status == "hit" else sum(m.seconds for m in report.methods)
    engine = TorchEngine(model, tokenizer, _limits(cfg, variant))
    return BuiltEngine(engine, tokenizer, report, total - compress_s, compress_s, cache_status)


def _engine_process(cfg: SlimserveConfig, variant: str) -> BuiltEngine:
    """The torch engine in its own process; this side keeps only the tokenizer."""
    from .engine_process import EngineProcess

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model_for(variant)))
    engine = EngineProcess(cfg, variant, ENGINE_START_TIMEOUT_S)
    ready = engine.ready
    return BuiltEngine(
        engine,
        tokenizer,
        ready.report,
        ready.load_seconds,
        ready.compress_seconds,
        ready.cache_status,
    )


def build_engine(cfg: SlimserveConfig, variant: str) -> BuiltEngine:
    """The engine a variant's replica serves with (not started yet)."""
    options = cfg.engine_for(variant)
    limits = _limits(cfg, variant)
    if options.name == "torch":
        if options.separate_process:
            return _engine_process(cfg, variant)
        return build_torch_engine(cfg, variant)
    cache_status = "miss"
    if cfg.variants[variant].compression:
        path, tokenizer, report, load_s, compress_s = _compressed_checkpoint(cfg, variant)
        cache_status = "export-hit" if compress_s == 0.0 else "export-miss"
    else:
        started = time.perf_counter()
        path = resolve_model(cfg.model_for(variant))
        tokenizer = AutoTokenizer.from_pretrained(path)
        size = checkpoint_weight_bytes(path)
        report = CompressionReport(weight_bytes_before=size, weight_bytes_after=size)
        load_s, compress_s = time.perf_counter() - started, 0.0
    engine = VllmEngine(path, options.dtype, limits, options.enforce_eager, options.kv_cache_gb)
    return BuiltEngine(engine, tokenizer, report, load_s, compress_s, cache_status)
