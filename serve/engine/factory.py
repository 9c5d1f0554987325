"""Build a variant's engine from the config: load, compress, and (for vLLM) export."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from filelock import FileLock
from transformers import AutoTokenizer

from slimserve.compression import CompressionReport
from slimserve.models.store import cache_root, checkpoint_weight_bytes, resolve_model

from ..config import SlimserveConfig
from .limits import EngineLimits
from .protocol import Engine
from .torch_engine import TorchEngine
from .vllm_engine import VllmEngine

log = logging.getLogger(__name__)


E = TypeVar("E", bound=Engine)


@dataclass
class BuiltEngine(Generic[E]):
    engine: E
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
        prefix_cache_tokens=options.prefix_cache_tokens,
    )


# Inside an export, written before it is renamed into place: a directory with it is complete.
_EXPORT_REPORT = "slimserve-report.json"


def _artifact_key(model_name: str, specs: list[Any], dtype: str) -> str:
    """The compressed artifact's cache key, so an export goes stale exactly when it does."""
    from slimserve.compression.artifact_cache import artifact_key, compression_key, library_versions
    from slimserve.compression.artifact_store import UncacheableError

    try:
        return compression_key(model_name, specs, dtype)
    except UncacheableError as error:
        # No local weights to fingerprint (a hub id): the name stands in for them.
        log.warning(
            "vLLM export of %s is keyed by its name, not its weights: %s", model_name, error
        )
        return artifact_key(
            {
                "model": model_name,
                "dtype": dtype,
                "specs": [spec.model_dump(mode="json") for spec in specs],
                "versions": library_versions(),
            }
        )


def _export_key(artifact_key: str) -> str:
    """The artifact's key plus what the export itself depends on (exporter code and format)."""
    from .vllm_export import exporter_identity

    blob = json.dumps({"artifact": artifact_key, "exporter": exporter_identity()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _compressed_checkpoint(
    cfg: SlimserveConfig, variant: str
) -> tuple[str, Any, CompressionReport, float, float]:
    """The variant's vLLM export: reused when present, else written from the compressed artifact
    (load_or_compress: loaded from the artifact cache, or compressed once and cached)."""
    from slimserve.compression.artifact_cache import load_or_compress

    from .vllm_export import export_for_vllm

    options = cfg.engine_for(variant)
    model_name = cfg.model_for(variant)
    specs = cfg.variants[variant].compression
    started = time.perf_counter()
    key = _export_key(_artifact_key(model_name, specs, options.dtype))
    target = cache_root() / "vllm-exports" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        for stale in target.parent.glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a writer that died; we hold the lock
        if (target / _EXPORT_REPORT).is_file():
            log.info("variant %s: reusing the vLLM export at %s", variant, target)
            report = CompressionReport.model_validate_json((target / _EXPORT_REPORT).read_text())
            tokenizer = AutoTokenizer.from_pretrained(target)
            return str(target), tokenizer, report, time.perf_counter() - started, 0.0
        model, tokenizer, report, status = load_or_compress(model_name, specs, options.dtype)
        compress_s = 0.0 if status == "hit" else sum(m.seconds for m in report.methods)
        exporting = time.perf_counter()
        staging = target.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            export_for_vllm(model, tokenizer, staging)
            report = report.model_copy(
                update={"weight_bytes_after": checkpoint_weight_bytes(str(staging))}
            )
            (staging / _EXPORT_REPORT).write_text(report.model_dump_json())
            shutil.rmtree(target, ignore_errors=True)  # one left without its report
            os.rename(staging, target)  # atomic within one filesystem
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("variant %s: exported for vLLM at %s (artifact cache %s)", variant, target, status)
        # The export counts as compression time, so a miss never reports 0.0 (build_engine's hit).
        compress_s += time.perf_counter() - exporting
        return (
            str(target),
            tokenizer,
            report,
            time.perf_counter() - started - compress_s,
            compress_s,
        )


# Compression at startup (GPTQ on a large model) can take long; a hung child must still fail.
ENGINE_START_TIMEOUT_S = 3600.0


def build_torch_engine(cfg: SlimserveConfig, variant: str) -> BuiltEngine[TorchEngine]:
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


def _engine_process(cfg: SlimserveConfig, variant: str) -> BuiltEngine[Engine]:
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


def build_engine(cfg: SlimserveConfig, variant: str) -> BuiltEngine[Engine]:
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
