"""Compress once, reload fast: a cache of compressed models keyed by everything that shapes them.

Key = sha256(model fingerprint, dtype, specs JSON, calibration files' content, library versions and
a digest of slimserve's own compression/kernel code). Each artifact is a directory named by the
key holding model.safetensors and manifest.json (see artifact_store). Replicas serialise on a
file lock per key, and an artifact is written to a temp dir and renamed into place, so a reader
never sees half of one. A corrupt or mismatched artifact is logged, deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock

from . import artifact_store as store
from .registry import apply_compression
from .report import CompressionReport, resident_weight_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CacheStatus = Literal["hit", "miss", "rebuilt"]
_PACKAGE_DIRS = ("compression", "kernels")  # code whose change must invalidate artifacts


def default_cache_dir() -> Path:
    from slimserve.models.paths import cache_root

    return cache_root() / "artifacts"


def _file_digest_cached(path: Path, cache_file: Path) -> str:
    """sha256 of a weight file, remembered by (path, size, mtime) so restarts skip re-reading."""
    stat = path.stat()
    token = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(cache_file.read_text())
    except (FileNotFoundError, ValueError):
        known = {}
    if token in known:
        return known[token]
    digest = store.file_sha256(path)
    known[token] = digest
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    scratch = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.{uuid.uuid4().hex}")
    scratch.write_text(json.dumps(known))
    os.replace(scratch, cache_file)  # concurrent writers: last one wins, each file whole
    return digest


def model_fingerprint(model_path: str | Path, cache_dir: Path) -> str:
    """Hash of config.json and the content of every weight file in the model directory."""
    directory = Path(model_path)
    if not (directory / "config.json").is_file():
        raise store.UncacheableError(f"{model_path} is not a local model directory")
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    weights = sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")])
    for path in weights:
        digest.update(path.name.encode())
        digest.update(_file_digest_cached(path, cache_dir / "fingerprints.json").encode())
    return digest.hexdigest()


def _code_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in _PACKAGE_DIRS:
        # Recursive: compression methods live in sub-packages (compression/methods/).
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    try:
        slimserve = importlib.metadata.version("slimserve")
    except importlib.metadata.PackageNotFoundError:
        slimserve = "unknown"
    return {
        "cache_format": str(CACHE_FORMAT),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "slimserve": slimserve,
        "slimserve_code": _code_digest(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",  # pydoc calibration text
    }


def _calibration_files(spec_dumps: list[dict[str, Any]]) -> dict[str, str]:
    """Content hashes of user calibration files named by the specs (their text shapes weights)."""
    hashes = {}
    for dump in spec_dumps:
        source = (dump.get("calibration") or {}).get("source")
        if source and source != "pydoc":
            path = Path(source).expanduser()
            hashes[source] = store.file_sha256(path) if path.is_file() else "missing"
    return hashes


def artifact_identity(
    model_path: str, specs: Sequence[Any], dtype: str, cache_dir: Path
) -> dict[str, Any]:
    """The inputs the key hashes; stored in the manifest to explain a mismatch."""
    spec_dumps = [spec.model_dump(mode="json") for spec in specs]
    return {
        "fingerprint": model_fingerprint(model_path, cache_dir),
        "dtype": dtype,
        "specs": spec_dumps,
        "calibration_files": _calibration_files(spec_dumps),
        "versions": library_versions(),
    }


def artifact_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(store.canonical_json(identity).encode()).hexdigest()


def _cache_dir(cache_dir: Path | None) -> Path:
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def compression_key(
    model_name: str, specs: Sequence[Any], dtype: str, cache_dir: Path | None = None
) -> str:
    """The key load_or_compress keeps this compression under, without loading any weights.

    Derived outputs (the vLLM export) key on it, so they change whenever the artifact would.
    Raises UncacheableError where load_or_compress would serve the model uncached.
    """
    from slimserve.models.store import resolve_model

    return artifact_key(
        artifact_identity(resolve_model(model_name), specs, dtype, _cache_dir(cache_dir))
    )


def _mismatch(manifest: store.Manifest, key: str, identity: dict[str, Any]) -> str | None:
    if manifest.format != CACHE_FORMAT:
        return f"cache format {manifest.format} != {CACHE_FORMAT}"
    if manifest.key != key:
        return "key differs"
    for field in ("fingerprint", "dtype", "specs", "versions"):
        if getattr(manifest, field) != identity[field]:
            return f"{field} differs"
    return None


def _load_plain(model_path: str, dtype: str):
    from slimserve.models.loading import causal_lm_from_pretrained
    from slimserve.models.store import torch_dtype

    model = causal_lm_from_pretrained(model_path, dtype=torch_dtype(dtype))
    return model.eval()


def _try_load(directory: Path, key: str, identity: dict[str, Any], base_config: Any):
    manifest = store.read_manifest(directory)
    reason = _mismatch(manifest, key, identity)
    if reason is not None:
        raise store.ArtifactError(f"artifact is for other inputs ({reason})")
    return store.load(directory, manifest, base_config), manifest.report


def _save(
    model,
    directory: Path,
    cache_dir: Path,
    key: str,
    identity: dict[str, Any],
    model_name: str,
    report: CompressionReport,
    base_config: Any,
) -> None:
    from slimserve.models.store import torch_dtype

    described = store.describe(model, base_config, torch_dtype(identity["dtype"]))
    scratch = cache_dir / f".tmp-{directory.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True)
    try:
        fields = {
            "format": CACHE_FORMAT,
            "key": key,
            "model": model_name,
            "fingerprint": identity["fingerprint"],
            "dtype": identity["dtype"],
            "specs": identity["specs"],
            "versions": identity["versions"],
            "report": report,
            **described,
        }
        manifest = store.write(model, scratch, fields)
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(scratch, directory)  # atomic within one filesystem
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    log.info("cached %s (%.1f MB) at %s", model_name, manifest.weights_bytes / 1e6, directory)


def load_or_compress(
    model_name: str,
    specs: Sequence[Any],
    dtype: str,
    cache_dir: Path | None = None,
):
    """(model, tokenizer, CompressionReport, "hit" | "miss" | "rebuilt").

    With no specs there is nothing to cache: the plain model loads and the status is "miss".
    A model that is not a local directory, or a compression the artifact format cannot describe,
    is compressed and served uncached (logged), also as "miss".
    """
    from transformers import AutoConfig, AutoTokenizer

    from slimserve.models.store import resolve_model

    started = time.perf_counter()
    model_path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not specs:
        model = _load_plain(model_path, dtype)
        bytes_now = resident_weight_bytes(model)
        report = CompressionReport(weight_bytes_before=bytes_now, weight_bytes_after=bytes_now)
        return model, tokenizer, report, "miss"
    cache_dir = _cache_dir(cache_dir)
    try:
        identity = artifact_identity(model_path, specs, dtype, cache_dir)
    except store.UncacheableError as error:
        log.warning("not caching %s: %s", model_name, error)
        model = _load_plain(model_path, dtype)
        return model, tokenizer, apply_compression(model, specs), "miss"
    key = artifact_key(identity)
    directory = cache_dir / key[:32]
    base_config = AutoConfig.from_pretrained(model_path)
    with FileLock(str(directory) + ".lock"):
        for stale in cache_dir.glob(f".tmp-{directory.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a writer that died; we hold the lock
        status: CacheStatus = "miss"
        if directory.exists():
            try:
                model, report = _try_load(directory, key, identity, base_config)
                log.info(
                    "loaded cached %s from %s in %.2fs",
                    model_name,
                    directory,
                    time.perf_counter() - started,
                )
                return model, tokenizer, report, "hit"
            except Exception as error:  # corrupt, mismatched, or unbuildable: never half-use it
                log.warning("discarding cached artifact %s: %s; rebuilding", directory, error)
                shutil.rmtree(directory, ignore_errors=True)
                status = "rebuilt"
        model = _load_plain(model_path, dtype)
        report = apply_compression(model, specs)
        try:
            _save(model, directory, cache_dir, key, identity, model_name, report, base_config)
        except store.UncacheableError as error:
            log.warning("serving %s uncached: %s", model_name, error)
        return model, tokenizer, report, status
