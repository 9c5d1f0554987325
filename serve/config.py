"""The one YAML config, as pydantic models validated at load time."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimserve.compression.specs import CompressionSpec


def vllm_can_run(spec: CompressionSpec) -> bool:
    """Whether vLLM for CPU has kernels for what this spec produces (see vllm_export)."""
    if spec.method == "smoothquant-w8a8":
        return not getattr(spec, "include_embeddings", False)  # no int8 embedding in vLLM
    return spec.method in ("rtn", "gptq", "awq") and getattr(spec, "bits", None) == 4


VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineOptions(_Strict):
    name: Literal["torch", "vllm"] = "torch"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_num_seqs: int = Field(32, ge=1, le=512, description="requests decoded together")
    max_model_len: int = Field(2048, ge=16, description="prompt + completion tokens per request")
    max_queued_requests: int = Field(256, ge=0, description="waiting requests before 503")
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="prompt tokens prefilled per step, so decodes keep flowing"
    )
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads; default: all")
    # vLLM only
    enforce_eager: bool = Field(True, description="vllm: skip graph compilation (faster start)")
    kv_cache_gb: float = Field(1.0, gt=0, description="vllm: KV-cache memory in GiB")


class DeploymentOptions(_Strict):
    replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus: float = Field(1.0, ge=0)


class VariantConfig(_Strict):
    model: str | None = Field(None, description="another checkpoint (e.g. a student)")
    compression: list[CompressionSpec] = Field(default_factory=list)
    engine: EngineOptions | None = None
    deployment: DeploymentOptions | None = None


class RoutingConfig(_Strict):
    split: dict[str, float] = Field(default_factory=dict, description="variant -> weight")
    sticky_key: str | None = Field(None, description="header:<name> to pin a caller to a variant")
    variant_header: str = "x-slimserve-variant"

    @field_validator("split")
    @classmethod
    def _weights_valid(cls, split: dict[str, float]) -> dict[str, float]:
        for name, weight in split.items():
            if weight < 0:
                raise ValueError(f"weight for {name!r} is negative ({weight})")
        if split and sum(split.values()) <= 0:
            raise ValueError("weights must not all be zero")
        return split

    @field_validator("sticky_key")
    @classmethod
    def _sticky_is_header(cls, key: str | None) -> str | None:
        if key is not None and (not key.startswith("header:") or len(key) <= len("header:")):
            raise ValueError("must look like 'header:<name>', e.g. header:x-user-id")
        return key

    @property
    def sticky_header(self) -> str | None:
        return self.sticky_key.removeprefix("header:").lower() if self.sticky_key else None


class ServerOptions(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class SlimserveConfig(_Strict):
    model: str = Field(description="embedded alias, a local HF directory, or a hub id")
    served_model_name: str | None = Field(None, description="name clients use; default: model")
    variants: dict[str, VariantConfig]
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    server: ServerOptions = Field(default_factory=ServerOptions)

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: dict[str, VariantConfig]) -> dict[str, VariantConfig]:
        if not variants:
            raise ValueError("at least one variant is needed, e.g. `full: {}`")
        for name in variants:
            if not VARIANT_NAME.match(name):
                raise ValueError(f"variant name {name!r} must match {VARIANT_NAME.pattern}")
        return variants

    @model_validator(mode="after")
    def _vllm_variants_exportable(self) -> SlimserveConfig:
        for name, variant in self.variants.items():
            if self.engine_for(name).name != "vllm":
                continue
            for index, spec in enumerate(variant.compression):
                if not vllm_can_run(spec):
                    raise ValueError(
                        f"variants.{name}.compression.{index}: {spec.method} has no kernel in "
                        "vLLM's CPU build; engine 'vllm' takes smoothquant-w8a8 (with "
                        "include_embeddings: false) or 4-bit rtn / gptq / awq (or serve this "
                        "variant on engine 'torch')"
                    )
        return self

    @model_validator(mode="after")
    def _split_names_known(self) -> SlimserveConfig:
        unknown = sorted(set(self.routing.split) - set(self.variants))
        if unknown:
            raise ValueError(
                f"routing.split names unknown variants {unknown}; known: {sorted(self.variants)}"
            )
        return self

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_for(self, variant: str) -> EngineOptions:
        return self.variants[variant].engine or self.engine

    def deployment_for(self, variant: str) -> DeploymentOptions:
        return self.variants[variant].deployment or self.deployment

    def model_for(self, variant: str) -> str:
        return self.variants[variant].model or self.model

    def effective_split(self) -> dict[str, float]:
        """Weights summing to 1; with no split configured, all traffic goes to the first variant."""
        split = self.routing.split or {next(iter(self.variants)): 1.0}
        total = sum(split.values())
        return {name: weight / total for name, weight in split.items() if weight > 0}


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "config") -> SlimserveConfig:
    try:
        return SlimserveConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid {source}:\n{_describe(error)}") from None


def load_config(path: str | Path) -> SlimserveConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    return parse_config(data, source=f"config {path}")
