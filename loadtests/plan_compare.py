"""`slimserve plan --compare A.json B.json`: two plans side by side (before and after a change)."""

from __future__ import annotations

from slimserve.loadtests.plan_report import PlanReport


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return ""
    return f"{(b - a) / a:+.0%}"


def compare_table(a: PlanReport, b: PlanReport, name_a: str = "A", name_b: str = "B") -> str:
    rows: list[tuple[str, str, str, str]] = [
        ("created", a.created, b.created, ""),
        ("machine", f"{a.machine.cpu} {a.machine.isa}", f"{b.machine.cpu} {b.machine.isa}", ""),
        ("target requests/s", _num(a.target_rate), _num(b.target_rate), ""),
        (
            "SLO (quantile, TTFT s, ITL s)",
            f"{a.slo.quantile}, {a.slo.ttft_seconds}, {a.slo.itl_seconds}",
            f"{b.slo.quantile}, {b.slo.ttft_seconds}, {b.slo.itl_seconds}",
            "",
        ),
    ]
    for variant in sorted(set(a.capacities) | set(b.capacities)):
        ca, cb = a.capacities.get(variant), b.capacities.get(variant)
        for label, pick in (
            ("knee requests/s", lambda c: c.knee_request_rate),
            ("knee output tok/s", lambda c: c.knee_output_tokens_per_second),
            ("highest rate within SLO", lambda c: c.slo_request_rate),
            ("unloaded TTFT s", lambda c: c.unloaded_ttft_seconds),
        ):
            va = None if ca is None else pick(ca)
            vb = None if cb is None else pick(cb)
            rows.append((f"{variant}: {label}", _num(va), _num(vb), _change(va, vb)))
    plans_a = {p.variant: p for p in a.plans}
    plans_b = {p.variant: p for p in b.plans}
    for variant in sorted(set(plans_a) | set(plans_b)):
        pa, pb = plans_a.get(variant), plans_b.get(variant)
        ra = None if pa is None else float(pa.replicas)
        rb = None if pb is None else float(pb.replicas)
        rows.append((f"{variant}: replicas", _num(ra, 0), _num(rb, 0), _change(ra, rb)))
    rows += [
        (
            "total replicas",
            str(a.totals.replicas),
            str(b.totals.replicas),
            _change(a.totals.replicas, b.totals.replicas),
        ),
        (
            "$/hour",
            _num(a.totals.dollars_per_hour),
            _num(b.totals.dollars_per_hour),
            _change(a.totals.dollars_per_hour, b.totals.dollars_per_hour),
        ),
        (
            "$/M output tokens",
            _num(a.totals.dollars_per_million_output_tokens),
            _num(b.totals.dollars_per_million_output_tokens),
            _change(
                a.totals.dollars_per_million_output_tokens,
                b.totals.dollars_per_million_output_tokens,
            ),
        ),
        ("validation", _verdict(a), _verdict(b), ""),
    ]
    header = ("", name_a, name_b, "change")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in [header, *rows]
    )


def _verdict(report: PlanReport) -> str:
    if report.validation is None:
        return "not run"
    return "held" if report.validation.held else "did not hold"
