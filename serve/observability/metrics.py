"""Gateway metrics in Prometheus format: one registry per gateway replica.

Request metrics are recorded as requests pass; the variant gauges (memory, MFU, quality,
compression) are refreshed from the replicas' stats at scrape time.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5)


class GatewayMetrics:
    def __init__(self, variants: list[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "slimserve_requests", "Finished requests", ["variant", "endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "slimserve_time_to_first_token_seconds",
            "Request arrival to first token",
            ["variant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "slimserve_inter_token_latency_seconds",
            "Gap between consecutive tokens",
            ["variant"],
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "slimserve_e2e_request_latency_seconds",
            "Request arrival to last token",
            ["variant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "slimserve_prompt_tokens", "Prompt tokens processed", ["variant"], registry=r
        )
        self.generation_tokens = Counter(
            "slimserve_generation_tokens", "Tokens generated", ["variant"], registry=r
        )
        self.variant_up = Gauge(
            "slimserve_variant_up",
            "0 while the variant is down (its replicas lost, or it failed to load), else 1",
            ["variant"],
            registry=r,
        )
        self.weight_bytes = Gauge(
            "slimserve_variant_weight_bytes",
            "Resident weight bytes of one replica",
            ["variant"],
            registry=r,
        )
        self.compression_ratio = Gauge(
            "slimserve_variant_compression_ratio",
            "Full weight bytes over this variant's",
            ["variant"],
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "slimserve_variant_kv_cache_bytes",
            "KV-cache bytes of one replica (reserved; resident as positions are written)",
            ["variant"],
            registry=r,
        )
        self.prefix_cached_tokens = Gauge(
            "slimserve_variant_prefix_cached_tokens",
            "Prompt tokens whose K/V came from the prefix cache since the replica started",
            ["variant"],
            registry=r,
        )
        self.running = Gauge(
            "slimserve_variant_running_requests",
            "Requests in the running batch",
            ["variant"],
            registry=r,
        )
        self.waiting = Gauge(
            "slimserve_variant_waiting_requests",
            "Requests queued for a batch slot",
            ["variant"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "slimserve_queue_wait_seconds",
            "Arrival at the variant's engine to the start of the request's prefill",
            ["variant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._online_families(variants)
        for variant in variants:  # every variant shows up from the first scrape
            for family in (
                self.ttft,
                self.inter_token,
                self.e2e,
                self.queue_wait,
                self.prompt_tokens,
                self.generation_tokens,
            ):
                family.labels(variant)

    def _gauge(self, name: str, doc: str, labels: list[str]) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _online_families(self, variants: list[str]) -> None:
        g = self._gauge
        # memory
        self.rss_bytes = g(
            "slimserve_variant_resident_memory_bytes", "Process RSS of one replica", ["variant"]
        )
        self.gpu_allocated_bytes = g(
            "slimserve_variant_gpu_memory_allocated_bytes",
            "GPU memory torch has allocated in one replica (0 without a GPU)",
            ["variant"],
        )
        self.gpu_peak_bytes = g(
            "slimserve_variant_gpu_memory_peak_bytes",
            "Most GPU memory torch ever allocated in one replica (0 without a GPU)",
            ["variant"],
        )
        # compute
        self.flops_per_token = g(
            "slimserve_variant_model_flops_per_token",
            "Model FLOPs of one token at zero context, as compression left the model",
            ["variant", "part"],
        )
        self.peak_flops = g(
            "slimserve_variant_peak_flops_per_second",
            "Peak matmul FLOP/s of one replica's device (measured on CPU, spec table on GPU)",
            ["variant"],
        )
        self.achieved_flops = g(
            "slimserve_variant_achieved_flops_per_second",
            "Model FLOP/s the variant delivered over the MFU window, all replicas",
            ["variant"],
        )
        self.mfu = g(
            "slimserve_variant_mfu_ratio",
            "Model FLOPs utilization over the MFU window: achieved over peak x replicas",
            ["variant"],
        )
        self.replicas = g("slimserve_variant_replicas", "Configured replicas", ["variant"])
        # compression and quality
        self.sparsity = g(
            "slimserve_variant_sparsity_ratio", "Share of pruned (zero) weights", ["variant"]
        )
        self.compression_info = g(
            "slimserve_variant_compression_info",
            "1 for the variant's compression methods and engine",
            ["variant", "methods", "engine"],
        )
        self.runtime_info = g(
            "slimserve_variant_runtime_info",
            "1 for the dtype the variant computes in and the ISA level of its CPU kernels",
            ["variant", "dtype", "isa"],
        )
        self.perplexity = g(
            "slimserve_variant_self_bench_perplexity",
            "Perplexity on held-out text from the startup self-benchmark",
            ["variant", "text"],
        )
        self.bench_tokens_per_second = g(
            "slimserve_variant_self_bench_tokens_per_second",
            "Startup self-benchmark throughput (all streams of the batch together)",
            ["variant", "phase", "batch"],
        )
        self.cost = g(
            "slimserve_variant_cost_dollars_per_1k_tokens",
            "Dollars per 1k generated tokens (basis: observed, capacity, at_peak)",
            ["variant", "basis"],
        )
        # routing, shadow, canary
        self.split = g(
            "slimserve_routing_weight_ratio", "Share of public-name traffic routed", ["variant"]
        )
        self.shadow_requests = Counter(
            "slimserve_shadow_requests",
            "Shadow copies by outcome (shadowed, dropped, failed)",
            ["source", "target", "outcome"],
            registry=self.registry,
        )
        pair = ["source", "target"]
        self.shadow_exact_match = g(
            "slimserve_shadow_exact_match_ratio",
            "Share of shadow copies whose text equals the source's",
            pair,
        )
        self.shadow_agreement = g(
            "slimserve_shadow_token_agreement_ratio",
            "Share of reference positions where both variants' top next token agree",
            pair,
        )
        self.shadow_kl = g(
            "slimserve_shadow_next_token_kl_nats",
            "Mean KL(source || target) of next-token distributions over prompt + reference",
            pair,
        )
        self.shadow_perplexity = g(
            "slimserve_shadow_reference_perplexity",
            "Perplexity of the source's completion under each side of the pair",
            [*pair, "scored_by"],
        )
        self.shadow_comparisons = g(
            "slimserve_shadow_window_comparisons",
            "Comparisons the shadow means are over (a bounded window)",
            pair,
        )
        self.canary_state = g(
            "slimserve_canary_state",
            "1 for a candidate's canary state (canary, promoted, rolled_back)",
            ["variant", "state"],
        )
        self.canary_decision = g(
            "slimserve_canary_decision",
            "1 for the candidate's last decision (promote, hold, rollback)",
            ["variant", "action"],
        )
        self.canary_transitions = Counter(
            "slimserve_canary_transitions",
            "Split changes the canary made (promote, rollback)",
            ["variant", "action"],
            registry=self.registry,
        )
        self.canary_auto = g(
            "slimserve_canary_auto_enabled", "1 while the canary moves the split itself", []
        )
        for variant in variants:
            for family in (self.mfu, self.achieved_flops):
                family.labels(variant)

    def update_variant(self, variant: str, stats: dict | None) -> None:
        if stats is None:
            return
        self.weight_bytes.labels(variant).set(stats["weight_bytes"])
        self.compression_ratio.labels(variant).set(stats["compression_ratio"])
        self.kv_cache_bytes.labels(variant).set(stats["engine"]["kv_cache_bytes"])
        self.running.labels(variant).set(stats["engine"]["running"])
        self.waiting.labels(variant).set(stats["engine"]["waiting"])
        if "prefix_cached_tokens" in stats["engine"]:  # engine "torch" only
            self.prefix_cached_tokens.labels(variant).set(stats["engine"]["prefix_cached_tokens"])
        self._update_online(variant, stats)

    def _update_online(self, variant: str, stats: dict[str, Any]) -> None:
        memory = stats.get("memory")
        if memory:
            self.rss_bytes.labels(variant).set(memory["rss_bytes"])
            self.gpu_allocated_bytes.labels(variant).set(memory["gpu_allocated_bytes"])
            self.gpu_peak_bytes.labels(variant).set(memory["gpu_peak_bytes"])
        flops = stats.get("flops")
        if flops:
            for part in ("body", "head"):
                self.flops_per_token.labels(variant, part).set(flops[f"{part}_flops_per_token"])
            self.flops_per_token.labels(variant, "attention_per_context_token").set(
                flops["attention_flops_per_context_token"]
            )
        if stats.get("peak"):
            self.peak_flops.labels(variant).set(stats["peak"]["flops_per_second"])
        self.sparsity.labels(variant).set(stats.get("sparsity", 0.0))
        methods = ",".join(stats.get("compression_methods") or []) or "none"
        self.compression_info.labels(variant, methods, stats.get("engine_name", "")).set(1)
        cpu = stats.get("cpu") or {}
        self.runtime_info.labels(variant, stats.get("dtype", ""), cpu.get("isa", "")).set(1)
        bench = stats.get("self_bench")
        if bench:
            if bench.get("perplexity") is not None:
                self.perplexity.labels(variant, bench["text"]).set(bench["perplexity"])
            for phase in ("prefill", "decode"):
                for batch, rate in bench[f"{phase}_tokens_per_second"].items():
                    self.bench_tokens_per_second.labels(variant, phase, batch).set(rate)

    def update_shadow(self, source: str, target: str, summary: Any) -> None:
        """summary: a serve.shadow_scores.ShadowSummary."""
        pair = (source, target)
        self.shadow_comparisons.labels(*pair).set(summary.comparisons)
        for gauge, value in (
            (self.shadow_exact_match, summary.exact_match),
            (self.shadow_agreement, summary.token_agreement),
            (self.shadow_kl, summary.next_token_kl_nats),
        ):
            if value is not None:
                gauge.labels(*pair).set(value)
        for side in ("source", "target"):
            value = getattr(summary, f"{side}_reference_perplexity")
            if value is not None:
                self.shadow_perplexity.labels(*pair, side).set(value)

    def update_split(self, variants: list[str], split: dict[str, float]) -> None:
        for variant in variants:
            self.split.labels(variant).set(split.get(variant, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
