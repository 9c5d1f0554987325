"""What `slimserve plan` writes: report.json, a CSV per run, a self-contained HTML report with
plots (inline SVG), the recommended slimserve config and a Ray Serve config for `serve deploy`."""

from __future__ import annotations

import csv
import io
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import yaml
from pydantic import BaseModel

from slimserve.kernels import cpu_isa
from slimserve.loadtests.load_stats import SLO
from slimserve.loadtests.planner import Validation, VariantCapacity, VariantPlan

matplotlib.use("svg")
from matplotlib import pyplot

RECORD_COLUMNS = [
    "started",
    "status",
    "error",
    "variant",
    "prompt_tokens",
    "output_tokens",
    "client_wait_seconds",
    "ttft_seconds",
    "itl_seconds",
    "e2e_seconds",
]


class Machine(BaseModel):
    cpu: str
    isa: str
    cores: int

    @classmethod
    def this_one(cls) -> Machine:
        model = "unknown"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return cls(cpu=model, isa=str(cpu_isa.describe()["isa"]), cores=os.cpu_count() or 1)


class Totals(BaseModel):
    replicas: int
    cpus: float
    memory_bytes: int | None
    dollars_per_hour: float
    dollars_per_million_output_tokens: float | None


class LoadShape(BaseModel):
    endpoint: str
    max_tokens: int
    prompt_words: int
    run_seconds: float


class PlanReport(BaseModel):
    created: str
    machine: Machine
    config: str  # the slimserve config the variants come from
    public_model: str
    slo: SLO
    target_rate: float
    split: dict[str, float]  # shares, summing to 1
    headroom: float
    dollars_per_replica_hour: float
    load: LoadShape
    capacities: dict[str, VariantCapacity]
    plans: list[VariantPlan]
    totals: Totals
    validation: Validation | None = None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def totals(plans: list[VariantPlan], target_rate: float, mean_tokens: float) -> Totals:
    dollars = sum(p.dollars_per_hour for p in plans)
    memory = [p.memory_bytes for p in plans]
    tokens_per_hour = target_rate * mean_tokens * 3600
    return Totals(
        replicas=sum(p.replicas for p in plans),
        cpus=sum(p.cpus for p in plans),
        memory_bytes=None if None in memory else sum(m or 0 for m in memory),
        dollars_per_hour=dollars,
        dollars_per_million_output_tokens=dollars / tokens_per_hour * 1e6
        if tokens_per_hour > 0
        else None,
    )


def write_records_csv(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RECORD_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def recommended_config(source: dict[str, Any], report: PlanReport) -> dict[str, Any]:
    """The source slimserve config with each variant's replicas, in-flight bound and the split
    of the plan (variants the split leaves out are dropped)."""
    config = dict(source)
    variants = {}
    for plan in report.plans:
        if plan.replicas == 0:
            continue
        variant = dict(source["variants"][plan.variant] or {})
        deployment = dict(variant.get("deployment") or source.get("deployment") or {})
        deployment["replicas"] = plan.replicas
        deployment["max_ongoing_requests"] = plan.max_ongoing_requests
        deployment.pop("autoscaling", None)
        variant["deployment"] = deployment
        variants[plan.variant] = variant
    config["variants"] = variants
    routing = dict(source.get("routing") or {})
    routing["split"] = {p.variant: round(p.share * 100, 4) for p in report.plans if p.replicas}
    config["routing"] = routing
    return config


def serve_deploy_config(config_path: str, port: int = 8000) -> dict[str, Any]:
    """Ray Serve's config for `serve deploy`, pointing the app at the recommended config."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": port},
        "applications": [
            {
                "name": "slimserve",
                "route_prefix": "/",
                "import_path": "slimserve.serve.app:app_builder",
                "args": {"config": config_path},
            }
        ],
    }


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    pyplot.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _plots(report: PlanReport, records: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    slo = report.slo
    figures: dict[str, str] = {}

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
    for name, capacity in report.capacities.items():
        closed = [p for p in capacity.points if p.kind == "concurrency"]
        left.plot(
            [p.summary.output_tokens_per_second for p in closed],
            [(p.summary.ttft.p95 or 0) * 1000 for p in closed],
            marker="o",
            label=name,
        )
        knee = next(p for p in closed if round(p.load) == capacity.knee_concurrency)
        left.annotate(
            f"knee c={capacity.knee_concurrency}",
            (knee.summary.output_tokens_per_second, (knee.summary.ttft.p95 or 0) * 1000),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
        opened = sorted((p for p in capacity.points if p.kind == "rate"), key=lambda p: p.load)
        right.plot(
            [p.load for p in opened],
            [(p.summary.attainment.fraction if p.summary.attainment else 0) for p in opened],
            marker="o",
            label=name,
        )
    left.axhline(slo.ttft_seconds * 1000, color="grey", linestyle="--", label="TTFT SLO")
    left.set_xlabel("output tokens/s (closed loop, 1, 2, 4, ... streams)")
    left.set_ylabel("TTFT p95 (ms)")
    left.set_title("Throughput against latency")
    left.legend(fontsize=8)
    right.axhline(slo.quantile, color="grey", linestyle="--", label="target")
    right.set_xlabel("arrival rate (requests/s, open loop)")
    right.set_ylabel("share of requests within the SLO")
    right.set_title("SLO attainment against rate")
    right.legend(fontsize=8)
    figures["sweep"] = _svg(figure)

    if records:
        figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
        for name, rows in records.items():
            for axis, key in ((left, "ttft_seconds"), (right, "itl_seconds")):
                values = sorted(r[key] * 1000 for r in rows if key in r)
                if values:
                    fractions = [(i + 1) / len(values) for i in range(len(values))]
                    axis.plot(values, fractions, label=name)
        left.axvline(slo.ttft_seconds * 1000, color="grey", linestyle="--")
        right.axvline(slo.itl_seconds * 1000, color="grey", linestyle="--")
        left.set_xlabel("TTFT (ms)")
        right.set_xlabel("inter-token latency (ms)")
        for axis in (left, right):
            axis.set_ylabel("fraction of requests")
            axis.legend(fontsize=8)
        left.set_title("TTFT at each variant's highest rate within the SLO")
        right.set_title("Inter-token latency, same runs")
        figures["distributions"] = _svg(figure)
    return figures


_TEMPLATE = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html><head><meta charset="utf-8"><title>slimserve capacity plan</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.held { color: #11772d; font-weight: bold; } .missed { color: #b00020; font-weight: bold; }
svg { max-width: 100%; height: auto; }
</style></head><body>
<h1>Capacity plan for {{ r.public_model }}</h1>
<p>{{ r.created }} &middot; {{ r.machine.cpu }} ({{ r.machine.isa }}, {{ r.machine.cores }} cores)
&middot; config {{ r.config }}</p>
<p>SLO: {{ (r.slo.quantile * 100) | round(1) }}% of requests with TTFT &le;
{{ (r.slo.ttft_seconds * 1000) | round(1) }} ms and inter-token latency &le;
{{ (r.slo.itl_seconds * 1000) | round(1) }} ms. Load: {{ r.load.endpoint }},
{{ r.load.prompt_words }}-word prompts, {{ r.load.max_tokens }} output tokens.</p>
<h2>Recommendation</h2>
<p>Target {{ r.target_rate | round(3) }} requests/s, headroom {{ (r.headroom * 100) | round(0) }}%,
${{ r.dollars_per_replica_hour | round(3) }} per replica-hour.</p>
<table><tr><th>variant</th><th>share</th><th>requests/s</th><th>replicas</th>
<th>by queueing</th><th>by measured SLO rate</th><th>CPUs</th><th>memory MB</th>
<th>$/hour</th><th>$/M output tokens</th></tr>
{% for p in r.plans %}<tr><td>{{ p.variant }}</td><td>{{ (p.share * 100) | round(1) }}%</td>
<td>{{ p.request_rate | round(3) }}</td><td>{{ p.replicas }}</td>
<td>{{ p.replicas_by_queueing }}</td><td>{{ p.replicas_by_measurement }}</td>
<td>{{ p.cpus }}</td><td>{{ mb(p.memory_bytes) }}</td><td>{{ p.dollars_per_hour | round(3) }}</td>
<td>{{ money(p.dollars_per_million_output_tokens) }}</td></tr>{% endfor %}
<tr><th>total</th><th></th><th>{{ r.target_rate | round(3) }}</th><th>{{ r.totals.replicas }}</th>
<th></th><th></th><th>{{ r.totals.cpus }}</th><th>{{ mb(r.totals.memory_bytes) }}</th>
<th>{{ r.totals.dollars_per_hour | round(3) }}</th>
<th>{{ money(r.totals.dollars_per_million_output_tokens) }}</th></tr></table>
<h2>Capacity per replica</h2>
<table><tr><th>variant</th><th>knee (streams)</th><th>requests/s at knee</th>
<th>output tok/s at knee</th><th>highest rate within SLO</th><th>unloaded TTFT ms</th></tr>
{% for name, c in r.capacities.items() %}<tr><td>{{ name }}</td><td>{{ c.knee_concurrency }}</td>
<td>{{ c.knee_request_rate | round(3) }}</td>
<td>{{ c.knee_output_tokens_per_second | round(1) }}</td>
<td>{{ c.slo_request_rate | round(3) if c.slo_request_rate is not none else "none" }}</td>
<td>{{ (c.unloaded_ttft_seconds * 1000) | round(1) }}</td></tr>{% endfor %}</table>
{{ plots.sweep | safe }}
{% if plots.distributions %}{{ plots.distributions | safe }}{% endif %}
{% if r.validation %}{% set v = r.validation %}
<h2>Validation: <span class="{{ 'held' if v.held else 'missed' }}">
{{ "every SLO held" if v.held else "the plan did not hold" }}</span></h2>
{% if v.needed_cpus > v.available_cpus %}<p class="missed">Under-provisioned: the plan needs
{{ v.needed_cpus }} CPUs (each replica as many as it had while measured), the machine it was
deployed on has {{ v.available_cpus }}.</p>{% endif %}
<p>{{ v.requests }} requests at {{ v.request_rate | round(3) }}/s over {{ v.seconds | round(1) }} s;
errors: {{ v.errors or "none" }}; split chi-square
{{ v.split_chi_square | round(2) if v.split_chi_square is not none else "-" }}
(p = {{ v.split_p_value | round(3) if v.split_p_value is not none else "-" }}).</p>
<table><tr><th>variant</th><th>requests</th><th>share expected / served</th><th>TTFT p95 ms</th>
<th>margin ms</th><th>ITL p95 ms</th><th>margin ms</th><th>within SLO</th><th>held</th></tr>
{% for c in v.variants %}<tr><td>{{ c.variant }}</td><td>{{ c.requests }}</td>
<td>{{ (c.expected_share * 100) | round(1) }}% / {{ (c.observed_share * 100) | round(1) }}%</td>
<td>{{ ms(c.ttft_p95_seconds) }}</td><td>{{ ms(c.ttft_margin_seconds) }}</td>
<td>{{ ms(c.itl_p95_seconds) }}</td><td>{{ ms(c.itl_margin_seconds) }}</td>
<td>{{ pct(c.attainment.fraction) if c.attainment else "-" }}</td>
<td class="{{ 'held' if c.held else 'missed' }}">{{ "yes" if c.held else "no" }}</td></tr>
{% endfor %}</table>{% endif %}
</body></html>
"""
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_html(report: PlanReport, records: dict[str, list[dict[str, Any]]]) -> str:
    return _TEMPLATE.render(
        r=report,
        plots=_plots(report, records),
        ms=_ms,
        mb=_mb,
        money=_money,
        pct=lambda v: f"{v:.1%}",
    )


def write_report(
    report: PlanReport,
    out: Path,
    source_config: dict[str, Any],
    records: dict[str, list[dict[str, Any]]],
) -> dict[str, Path]:
    """Write every output into `out`; `records` are the runs at each variant's SLO rate (for the
    distribution plots). Returns the files written by role."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "report": out / "report.json",
        "html": out / "report.html",
        "config": out / "slimserve-config.yaml",
        "serve": out / "serve-config.yaml",
    }
    files["report"].write_text(report.model_dump_json(indent=2))
    files["config"].write_text(
        yaml.safe_dump(recommended_config(source_config, report), sort_keys=False)
    )
    files["serve"].write_text(
        yaml.safe_dump(serve_deploy_config(str(files["config"].resolve())), sort_keys=False)
    )
    files["html"].write_text(render_html(report, records))
    return files
