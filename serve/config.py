"""The one YAML config, as pydantic models validated at load time."""

from __future__ import annotations

import itertools
import logging
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimserve.compression.specs import CompressionSpec
from slimserve.distill.config import DistillConfig
from slimserve.kernels import cpu_isa

log = logging.getLogger(__name__)

VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineOptions(_Strict):
    name: Literal["torch", "vllm"] = "torch"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="auto: bfloat16 where the CPU computes it natively (AVX512_BF16 or AMX), "
        "float32 elsewhere (AVX2 emulates bf16 several times slower than fp32)",
    )
    max_num_seqs: int = Field(32, ge=1, le=512, description="requests decoded together")
    max_model_len: int = Field(2048, ge=16, description="prompt + completion tokens per request")
    max_queued_requests: int = Field(256, ge=0, description="waiting requests before 503")
    prefill_chunk_tokens: int = Field(
        512,
        ge=16,
        description="prompt tokens prefilled per step, over every prompt joining in it: waiting "
        "requests join together up to this budget, and a longer prompt is spread over steps so "
        "running decodes keep flowing",
    )
    prefix_cache_slots: int = Field(
        16,
        ge=0,
        description="torch: recent prompts kept for reuse (up to prefix_cache_tokens each, in a "
        "K/V store apart from the batch's slots), so requests sharing a prefix (a system prompt, "
        "an earlier turn, a repeated prompt) copy its K/V instead of recomputing it; 0 turns it "
        "off",
    )
    prefix_cache_tokens: int = Field(
        256,
        ge=8,
        description="torch: the longest prefix kept per prompt; the store holds "
        "prefix_cache_slots x this many positions of K/V",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="intra-op threads; default: all cores, less one for serving when the engine "
        "has its own process",
    )
    kernel_threads: int | None = Field(
        None,
        ge=1,
        description="torch: threads each call of slimserve's own CPU matmul kernels is shared "
        "across (they poll briefly between calls, then sleep); default: every core",
    )
    separate_process: bool = Field(
        True,
        description="torch: run the engine loop in its own process, so the replica's Python "
        "work (Ray, streaming) never waits on the model's",
    )
    # vLLM only
    enforce_eager: bool = Field(True, description="vllm: skip graph compilation (faster start)")
    kv_cache_gb: float = Field(1.0, gt=0, description="vllm: KV-cache memory in GiB")

    def resolved(self) -> EngineOptions:
        """These options with dtype `auto` made concrete for this machine's CPU (replicas
        resolve it where they run)."""
        if self.dtype != "auto":
            return self
        return self.model_copy(update={"dtype": cpu_isa.default_dtype()})

    def intra_op_threads(self) -> int:
        """An engine in its own process leaves one core to Ray and the token streaming (as
        vLLM's CPU engine does): on 2 cores, 1 compute thread served 10-20% more tokens/s
        through the gateway than 2 (loadtests/README.md)."""
        if self.torch_threads is not None:
            return self.torch_threads
        spare = 1 if self.name == "torch" and self.separate_process else 0
        return max(1, _cores() - spare)

    def native_kernel_threads(self) -> int:
        return self.kernel_threads if self.kernel_threads is not None else _cores()


def _cores() -> int:
    """The cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return cores or os.cpu_count() or 1


class AutoscalingOptions(_Strict):
    """Ray Serve autoscaling of a variant's replicas (its `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="requests in flight per replica the autoscaler aims at"
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        return self


class DeploymentOptions(_Strict):
    replicas: int = Field(1, ge=1, description="fixed replica count (unless autoscaling)")
    autoscaling: AutoscalingOptions | None = Field(
        None, description="scale between min and max replicas instead of a fixed count"
    )
    max_ongoing_requests: int = Field(64, ge=1, description="requests in flight per replica")
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="requests waiting for a replica of this variant (all of them at "
        "max_ongoing_requests); beyond it a request is refused at once with 503 + Retry-After",
    )
    num_cpus: float = Field(1.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources a replica needs (placement)"
    )
    stream_messages_per_second: float = Field(
        100.0,
        gt=0,
        description="messages a replica (or its engine process, for the streams it sends to "
        "the gateway itself) spends on all its token streams together: with n open, each "
        "stream's tokens go out at most every n / this seconds (first token at once)",
    )
    min_stream_interval_ms: float = Field(
        20.0,
        ge=0,
        description="shortest spacing of a stream's messages after its first token, however "
        "few streams share the budget: one stream alone sends a message per decode step "
        "otherwise, whose CPU the engine's own threads lose (loadtests/README.md)",
    )
    max_stream_interval_ms: float = Field(
        200.0, ge=0, description="longest a stream's generated tokens wait to be sent on"
    )
    early_start: bool = Field(
        True,
        description="with server.direct_streams and one replica, the gateway replica on its "
        "node sends each request to the replica's door, no Serve call made: the prompt reaches "
        "the engine at once and the call's CPU is saved. The door admits it against "
        "max_ongoing_requests (shared with Serve calls) or refuses it to a Serve call; Serve's "
        "own request metrics do not count door requests",
    )

    @model_validator(mode="after")
    def _intervals_ordered(self) -> DeploymentOptions:
        if self.min_stream_interval_ms > self.max_stream_interval_ms:
            raise ValueError(
                f"min_stream_interval_ms ({self.min_stream_interval_ms}) exceeds "
                f"max_stream_interval_ms ({self.max_stream_interval_ms})"
            )
        return self


class VariantConfig(_Strict):
    model: str | None = Field(None, description="another checkpoint")
    student: str | DistillConfig | None = Field(
        None,
        description="a student of the served model: its directory, or a distill config (a YAML "
        "path or inline) distilled on first start and cached",
    )
    compression: list[CompressionSpec] = Field(default_factory=list)
    engine: EngineOptions | None = None
    deployment: DeploymentOptions | None = None

    @model_validator(mode="after")
    def _one_checkpoint(self) -> VariantConfig:
        if self.model is not None and self.student is not None:
            raise ValueError("a variant names `model` or `student`, not both")
        return self


class ShadowRule(_Strict):
    """Replay `fraction` of the requests `source` served on `target`, off the caller's path."""

    source: str
    target: str
    fraction: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _distinct(self) -> ShadowRule:
        if self.source == self.target:
            raise ValueError(f"source and target are both {self.source!r}")
        return self


class RoutingConfig(_Strict):
    split: dict[str, float] = Field(default_factory=dict, description="variant -> weight")
    sticky_key: str | None = Field(None, description="header:<name> to pin a caller to a variant")
    variant_header: str = "x-slimserve-variant"
    shadow: list[ShadowRule] = Field(default_factory=list, description="shadow copies")

    @field_validator("shadow", mode="before")
    @classmethod
    def _one_rule_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value

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


class ShadowOptions(_Strict):
    """How shadow copies run (which requests are copied is routing.shadow)."""

    max_concurrency: int = Field(2, ge=1, description="shadow copies in flight; more: dropped")
    max_gateway_in_flight: int = Field(
        32, ge=0, description="caller requests in flight above which shadow copies are dropped"
    )
    timeout_seconds: float = Field(120.0, gt=0)
    max_score_tokens: int = Field(
        256, ge=2, description="prompt + reference tokens scored for KL (the rest is cut)"
    )
    window: int = Field(200, ge=1, description="recent comparisons kept per (source, target)")


class SelfBenchOptions(_Strict):
    """The benchmark each variant runs on itself right after loading."""

    enabled: bool = True
    text: str = Field("pydoc", description='held-out text: "pydoc" or a .txt / .jsonl path')
    perplexity_windows: int = Field(4, ge=0, description="windows scored for perplexity")
    window_tokens: int = Field(256, ge=8, description="tokens per perplexity window")
    prefill_tokens: int = Field(128, ge=1, description="prompt tokens in the prefill test")
    decode_tokens: int = Field(16, ge=1, description="tokens generated per stream")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError(f"batch sizes must be >= 1, got {sizes}")
        return sizes


class MfuOptions(_Strict):
    peak_flops_per_second: float | None = Field(
        None, gt=0, description="per replica; default: measured (CPU) or a spec table (GPU)"
    )
    window_seconds: float = Field(30.0, gt=0, description="achieved FLOP/s averaged over this")
    benchmark_seconds: float = Field(0.5, gt=0, le=30, description="CPU peak matmul benchmark")


class CanarySLO(_Strict):
    """Limits a candidate must meet; a null limit is not checked."""

    max_p95_ttft_seconds: float | None = Field(None, gt=0)
    max_p95_e2e_seconds: float | None = Field(None, gt=0)
    max_error_rate: float | None = Field(0.01, ge=0, le=1, description="5xx share of requests")
    max_perplexity_delta: float | None = Field(
        0.05, ge=0, description="(candidate - baseline) / baseline self-benchmark perplexity"
    )
    min_token_agreement: float | None = Field(0.8, ge=0, le=1)
    max_next_token_kl_nats: float | None = Field(0.5, ge=0)
    min_exact_match: float | None = Field(None, ge=0, le=1)
    min_samples: int = Field(20, ge=1, description="candidate requests per evaluation window")
    min_shadow_samples: int = Field(5, ge=1, description="shadow comparisons before judging")


class CanaryConfig(_Strict):
    enabled: bool = Field(False, description="move the split step by step by itself")
    baseline: str | None = Field(None, description="default: the first variant")
    candidates: list[str] | None = Field(None, description="default: every other variant")
    steps: list[float] = Field(
        default_factory=lambda: [10.0, 25.0, 50.0, 100.0],
        description="candidate traffic percent after each passing window",
    )
    interval_seconds: float = Field(60.0, gt=0, description="evaluation window")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="of the latency quantile CIs")
    reservoir: int = Field(2048, ge=16, description="recent request samples kept per variant")
    slo: CanarySLO = Field(default_factory=CanarySLO)

    @field_validator("steps")
    @classmethod
    def _steps_rise_to_100(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"steps must be percents in (0, 100], got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must increase, got {steps}")
        if steps[-1] != 100:
            raise ValueError(f"the last step must be 100, got {steps[-1]}")
        return steps


class CostOptions(_Strict):
    dollars_per_replica_hour: float = Field(1.0, ge=0)
    per_variant: dict[str, float] = Field(default_factory=dict, description="overrides")


class AdminOptions(_Strict):
    token: str | None = Field(None, description="bearer token of /admin; default: the env var")
    token_env: str = Field("SLIMSERVE_ADMIN_TOKEN", description="env var read when token unset")


class ServerOptions(_Strict):
    host: str = Field("127.0.0.1", description="loopback by default; bind wider on purpose")
    port: int = Field(8000, ge=1, le=65535)
    queue_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="a request that has not started generating by then is dropped (503 + "
        "Retry-After) and its queued work freed; a caller may ask for less or more with the "
        "x-slimserve-queue-timeout header (seconds)",
    )
    retry_after_seconds: int = Field(
        1, ge=0, description="the Retry-After of a 503 or 429 (overload, variant down)"
    )
    max_request_bytes: int = Field(
        4 * 2**20, ge=1024, description="larger request bodies are refused with 413, unread"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description='browser origins allowed (CORS); ["*"] for any'
    )
    api_key: str | None = Field(
        None,
        description="when set, /v1 requests need 'Authorization: Bearer <key>' (what OpenAI "
        "clients send as their api_key); default: the env var api_key_env",
    )
    api_key_env: str = Field("SLIMSERVE_API_KEY", description="env var read when api_key unset")
    health_probe_seconds: float = Field(
        5.0, gt=0, description="how often the gateway probes each variant (up or down)"
    )
    direct_streams: bool = Field(
        True,
        description="on the gateway replica's node, engine processes (or the variant replicas, "
        "for tokens they label and engines they run themselves) send streams' tokens to it "
        "themselves, not on Ray Serve's stream (the Serve call still spans the request); false: "
        "every token travels through the variant replica and Serve",
    )
    keep_serving_off_engine_cores: bool = Field(
        True,
        description="slimserve serve: where an engine binds its compute threads to some cores "
        "(vLLM's CPU engine does), the gateway, Ray's processes and the variant replicas run "
        "on the other cores (serve/cpu_placement.py)",
    )
    gateway_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources the gateway replica needs: pins it to the nodes "
        "that have them (e.g. the head), so losing a worker node never takes the gateway",
    )


class SlimserveConfig(_Strict):
    model: str = Field(description="embedded alias, a local HF directory, or a hub id")
    served_model_name: str | None = Field(None, description="name clients use; default: model")
    variants: dict[str, VariantConfig]
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    server: ServerOptions = Field(default_factory=ServerOptions)
    shadow: ShadowOptions = Field(default_factory=ShadowOptions)
    self_bench: SelfBenchOptions = Field(default_factory=SelfBenchOptions)
    mfu: MfuOptions = Field(default_factory=MfuOptions)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    cost: CostOptions = Field(default_factory=CostOptions)
    admin: AdminOptions = Field(default_factory=AdminOptions)

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
                if not spec.runs_on("vllm"):
                    raise ValueError(
                        f"variants.{name}.compression.{index}: {spec.method} has no kernel in "
                        "vLLM's CPU build; engine 'vllm' takes smoothquant-w8a8 (with "
                        "include_embeddings: false) or 4-bit rtn / gptq / awq (or serve this "
                        "variant on engine 'torch')"
                    )
            level = cpu_isa.active()
            needed = max((s.cpu_isa_needed("vllm") for s in variant.compression), default=None)
            if needed is not None and level < needed:
                raise ValueError(
                    f"variants.{name}: engine 'vllm' runs compressed checkpoints on CPU only with "
                    f"AVX-512 VNNI; this CPU runs at ISA level {level.label} (vLLM's engine core "
                    "dies on the 4-bit export there, and int8 GEMMs without VNNI saturate); "
                    "serve this variant on engine 'torch'"
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

    @model_validator(mode="after")
    def _online_names_known(self) -> SlimserveConfig:
        check_routing_names(self.routing, list(self.variants))
        known = set(self.variants)
        named = {
            "canary.baseline": [self.canary.baseline] if self.canary.baseline else [],
            "canary.candidates": self.canary.candidates or [],
            "cost.per_variant": list(self.cost.per_variant),
        }
        for where, names in named.items():
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(
                    f"{where} names unknown variants {unknown}; known: {sorted(known)}"
                )
        if self.canary_baseline in self.canary_candidates:
            raise ValueError(f"canary.candidates includes the baseline {self.canary_baseline!r}")
        return self

    @property
    def canary_baseline(self) -> str:
        return self.canary.baseline or next(iter(self.variants))

    @property
    def canary_candidates(self) -> list[str]:
        if self.canary.candidates is not None:
            return list(self.canary.candidates)
        return [name for name in self.variants if name != self.canary_baseline]

    def dollars_per_replica_hour(self, variant: str) -> float:
        return self.cost.per_variant.get(variant, self.cost.dollars_per_replica_hour)

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_for(self, variant: str) -> EngineOptions:
        """The variant's engine options, dtype resolved for the CPU of the calling machine."""
        return (self.variants[variant].engine or self.engine).resolved()

    def deployment_for(self, variant: str) -> DeploymentOptions:
        return self.variants[variant].deployment or self.deployment

    def model_for(self, variant: str) -> str:
        return self.variants[variant].model or self.model

    def effective_split(self) -> dict[str, float]:
        """Weights summing to 1; with no split configured, all traffic goes to the first variant."""
        split = self.routing.split or {next(iter(self.variants)): 1.0}
        total = sum(split.values())
        return {name: weight / total for name, weight in split.items() if weight > 0}


def check_routing_names(routing: RoutingConfig, variants: list[str]) -> None:
    """Shadow rules must name known variants (the split is checked where it is applied)."""
    for index, rule in enumerate(routing.shadow):
        unknown = sorted({rule.source, rule.target} - set(variants))
        if unknown:
            raise ValueError(
                f"routing.shadow.{index} names unknown variants {unknown}; "
                f"known: {sorted(variants)}"
            )


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


def check_against_models(config: SlimserveConfig, source: str = "config") -> None:
    """Specs that cannot apply to their model's architecture (e.g. a group size that does not
    divide a layer's width) fail here, naming the spec, before any replica starts."""
    from transformers import AutoConfig

    from slimserve.models.store import resolve_model

    for name, variant in config.variants.items():
        if not variant.compression:
            continue
        try:
            model_config = AutoConfig.from_pretrained(resolve_model(config.model_for(name)))
        except (OSError, ValueError) as error:
            log.warning(
                "variant %s: cannot read its model's config to check specs: %s", name, error
            )
            continue
        for index, spec in enumerate(variant.compression):
            try:
                spec.check_model(model_config)
            except ValueError as error:
                raise ConfigError(
                    f"invalid {source}:\n  variants.{name}.compression.{index}: {error}"
                ) from None


def load_config(path: str | Path, check_models: bool = True) -> SlimserveConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    config = parse_config(data, source=f"config {path}")
    if check_models:
        check_against_models(config, source=f"config {path}")
    return config
