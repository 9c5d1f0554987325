"""Gateway metrics in Prometheus format: one registry per gateway replica."""

from __future__ import annotations

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
            "1 when the variant answered its last stats probe",
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
            "KV-cache bytes of one replica",
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
        for variant in variants:  # every variant shows up from the first scrape
            for family in (
                self.ttft,
                self.inter_token,
                self.e2e,
                self.prompt_tokens,
                self.generation_tokens,
            ):
                family.labels(variant)

    def update_variant(self, variant: str, stats: dict | None) -> None:
        self.variant_up.labels(variant).set(0 if stats is None else 1)
        if stats is None:
            return
        self.weight_bytes.labels(variant).set(stats["weight_bytes"])
        self.compression_ratio.labels(variant).set(stats["compression_ratio"])
        self.kv_cache_bytes.labels(variant).set(stats["engine"]["kv_cache_bytes"])
        self.running.labels(variant).set(stats["engine"]["running"])
        self.waiting.labels(variant).set(stats["engine"]["waiting"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
