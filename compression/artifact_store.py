"""One compressed model on disk: model.safetensors plus manifest.json, and the way back.

Saving records what differs from the plain architecture: config fields (structured pruning),
every module whose class or shape changed (with its class import path and `meta()` constructor
arguments), and groups of state-dict names that share one tensor (a tied int8 embedding and
lm_head). Loading builds the model from its config with parameters on the meta device (the
original weights are never read), applies those changes, allocates empty tensors, re-ties the
shared ones and fills everything from the safetensors file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_model, save_model
from torch import nn

from slimserve.kernels.artifact import dtype_from_name, dtype_name

from .int8 import set_submodule
from .report import CompressionReport

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
# Config keys that describe the run, not the architecture.
_VOLATILE_CONFIG = {"dtype", "torch_dtype", "transformers_version", "architectures"}


class ArtifactError(RuntimeError):
    """An artifact on disk that must not be used (corrupt, unreadable, or for other inputs)."""


class UncacheableError(RuntimeError):
    """A compressed model this format cannot describe; it is served but not cached."""


class ModuleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cls: str = Field(description="import path, module:qualname")
    meta: dict[str, Any]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int
    key: str
    model: str
    fingerprint: str
    dtype: str
    specs: list[dict[str, Any]]
    versions: dict[str, str]
    config_changes: dict[str, Any]
    modules: dict[str, ModuleEntry]
    tied: list[list[str]]
    report: CompressionReport
    weights_sha256: str
    weights_bytes: int


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def config_changes(original: Any, changed: Any) -> dict[str, Any]:
    """Architecture fields the compression changed (e.g. num_hidden_layers after layer pruning)."""
    before, after = original.to_dict(), changed.to_dict()
    return {
        key: value
        for key, value in after.items()
        if not key.startswith("_") and key not in _VOLATILE_CONFIG and before.get(key) != value
    }


def _import(path: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _plain_entry(module: nn.Module) -> ModuleEntry | None:
    """Resized plain Linear / Embedding modules, described without a meta() of their own."""
    if type(module) is nn.Linear:
        meta = {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "dtype": dtype_name(module.weight.dtype),
        }
        return ModuleEntry(cls=_class_path(nn.Linear), meta=meta)
    if type(module) is nn.Embedding:
        meta = {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "dtype": dtype_name(module.weight.dtype),
        }
        return ModuleEntry(cls=_class_path(nn.Embedding), meta=meta)
    return None


def _build_module(entry: ModuleEntry) -> nn.Module:
    cls = _import(entry.cls)
    if cls is nn.Linear or cls is nn.Embedding:
        meta = dict(entry.meta)
        dtype = dtype_from_name(meta.pop("dtype"))
        with torch.device("meta"):
            return cls(*meta.values(), dtype=dtype)
    return cls.from_meta(entry.meta)


def _signature(module: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors]


def module_map(model: nn.Module, twin: nn.Module) -> dict[str, ModuleEntry]:
    """Modules of `model` whose class or own tensor shapes differ from `twin`.

    `twin` starts as the plain skeleton and is updated as entries are found (parents before
    children), so the children a shell's from_meta builds are compared with what they became,
    e.g. the factors of a LowRankLinear that a later int8 pass quantized.
    """
    entries: dict[str, ModuleEntry] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        try:
            reference = twin.get_submodule(name)
        except AttributeError:
            reference = None
        if (
            reference is not None
            and type(reference) is type(module)
            and _signature(reference) == _signature(module)
        ):
            continue
        if hasattr(module, "meta") and hasattr(type(module), "from_meta"):
            entry = ModuleEntry(cls=_class_path(type(module)), meta=module.meta())
        else:
            entry = _plain_entry(module)
        if entry is None:
            raise UncacheableError(
                f"module {name} ({type(module).__name__}) changed but has no meta()/from_meta()"
            )
        entries[name] = entry
        set_submodule(twin, name, _build_module(entry))
    return entries


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that are the very same tensor view (kept shared across save/load)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        groups.setdefault(key, []).append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The architecture with parameters on the meta device and real (computed) buffers."""
    from accelerate import init_empty_weights

    from slimserve.models.loading import causal_lm_from_config

    with init_empty_weights(include_buffers=False):
        return causal_lm_from_config(config, dtype=dtype)


def _materialize(model: nn.Module) -> None:
    """Give every meta tensor its own empty CPU storage (ties are restored separately)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                empty = torch.empty_like(param, device="cpu")
                module._parameters[name] = nn.Parameter(empty, requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    for names in groups:
        owner_name, _, attr = names[0].rpartition(".")
        owner = model.get_submodule(owner_name)
        is_param = attr in owner._parameters
        shared = owner._parameters[attr] if is_param else owner._buffers[attr]
        for other in names[1:]:
            parent_name, _, other_attr = other.rpartition(".")
            parent = model.get_submodule(parent_name)
            if other_attr in parent._parameters:
                parent._parameters[other_attr] = shared
            else:
                parent._buffers[other_attr] = shared


def rebuild(
    base_config: Any,
    dtype: torch.dtype,
    changes: dict[str, Any],
    modules: dict[str, ModuleEntry],
    tied: list[list[str]],
) -> nn.Module:
    """An empty (uninitialised) model with the compressed model's exact structure."""
    config = base_config.__class__.from_dict(base_config.to_dict())
    config._name_or_path = base_config._name_or_path
    for key, value in changes.items():
        setattr(config, key, value)
    model = skeleton(config, dtype)
    for name in sorted(modules, key=lambda n: n.count(".")):
        set_submodule(model, name, _build_module(modules[name]))
    _materialize(model)
    _retie(model, tied)
    return model.eval()


def _state_signature(model: nn.Module) -> dict[str, tuple]:
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def describe(model: nn.Module, base_config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Everything but the tensors; checked by rebuilding an empty twin and comparing."""
    changes = config_changes(base_config, model.config)
    changed_config = base_config.__class__.from_dict({**base_config.to_dict(), **changes})
    modules = module_map(model, skeleton(changed_config, dtype))
    tied = tied_groups(model)
    twin = rebuild(base_config, dtype, changes, modules, tied)
    if _state_signature(twin) != _state_signature(model):
        expected, got = _state_signature(model), _state_signature(twin)
        differing = sorted(set(expected.items()) ^ set(got.items()))[:5]
        raise UncacheableError(f"a rebuilt model would not match the compressed one: {differing}")
    return {"config_changes": changes, "modules": modules, "tied": tied}


def write(model: nn.Module, directory: Path, manifest_fields: dict[str, Any]) -> Manifest:
    """Write weights then manifest into `directory` (a fresh temp dir the caller renames)."""
    weights = directory / WEIGHTS
    save_model(model, str(weights))
    manifest = Manifest(
        **manifest_fields,
        weights_sha256=file_sha256(weights),
        weights_bytes=weights.stat().st_size,
    )
    (directory / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    return manifest


def read_manifest(directory: Path) -> Manifest:
    try:
        return Manifest.model_validate_json((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError("manifest.json is missing") from None
    except ValueError as error:
        raise ArtifactError(f"manifest.json is unreadable: {str(error)[:200]}") from None


def load(directory: Path, manifest: Manifest, base_config: Any) -> nn.Module:
    """Verify the weights' hash, rebuild the structure and load the tensors."""
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ArtifactError("model.safetensors is missing")
    if weights.stat().st_size != manifest.weights_bytes:
        raise ArtifactError(
            f"model.safetensors has {weights.stat().st_size} bytes, manifest says "
            f"{manifest.weights_bytes}"
        )
    digest = file_sha256(weights)
    if digest != manifest.weights_sha256:
        raise ArtifactError(f"model.safetensors sha256 {digest[:12]} != manifest's")
    model = rebuild(
        base_config,
        dtype_from_name(manifest.dtype),
        manifest.config_changes,
        manifest.modules,
        manifest.tied,
    )
    try:
        with torch.no_grad():
            load_model(model, str(weights), strict=True)
    except Exception as error:  # safetensors and torch raise several types for a bad file
        raise ArtifactError(f"model.safetensors could not be loaded: {error}") from error
    return model


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
