"""`slimserve loadtest` and `slimserve plan`: one load run, and a capacity plan that is swept,
recommended, written and (with --validate) deployed and checked.

    slimserve loadtest [--url URL] [--users N | --rate R] [--requests N] [--seconds S]
    slimserve plan CONFIG --target-rate R [--split full=70,int8=30] [--slo-ttft S]
        [--slo-itl S] [--out DIR] [--url URL] [--validate]
    slimserve plan CONFIG --from-report DIR/report.json --validate
    slimserve plan --compare A/report.json B/report.json

`plan` sweeps each variant pinned by model name (NAME:variant) through one gateway: the one at
--url, or one it starts itself from CONFIG (`slimserve serve` in a process of its own) and stops
after. Locust is imported (and gevent patches this process) only when a command runs load.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from slimserve.serve.ports import free_port

if TYPE_CHECKING:
    from slimserve.loadtests.load_run import LoadSpec
    from slimserve.loadtests.load_stats import SLO
    from slimserve.loadtests.plan_report import PlanReport
    from slimserve.loadtests.planner import SweepPoint, SweepSettings, Validation, VariantCapacity
    from slimserve.serve.config import SlimserveConfig

log = logging.getLogger("slimserve.loadtests.plan")

OPEN_LOOP_USERS = 256  # most requests in flight from the client in an open-loop run


@contextmanager
def gateway_process(config_path: Path, log_path: Path, timeout: float = 900.0) -> Iterator[str]:
    """`slimserve serve CONFIG` on a free loopback port, in a process group of its own; yields
    its URL once /health answers 200 and stops it (SIGINT: its clean stop) on the way out."""
    import httpx

    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "slimserve.serve.cli",
                "serve",
                str(config_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited ({process.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not healthy in {timeout:.0f} s; {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        log.info("gateway up at %s (%s)", url, config_path)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            log.warning("the gateway did not stop in 120 s; killing it")
        with suppress(ProcessLookupError):  # already gone with its group
            os.killpg(process.pid, signal.SIGKILL)


def _slo(args: argparse.Namespace) -> SLO:
    from slimserve.loadtests.load_stats import SLO

    return SLO(ttft_seconds=args.slo_ttft, itl_seconds=args.slo_itl, quantile=args.slo_quantile)


def _parse_split(text: str | None, config: SlimserveConfig) -> dict[str, float]:
    from slimserve.loadtests.planner import normalized_split

    if text:
        split = {}
        for part in text.split(","):
            name, _, weight = part.partition("=")
            if name not in config.variants:
                raise SystemExit(f"slimserve plan: --split names {name!r}, not a variant")
            split[name] = float(weight)
    else:
        split = dict(config.routing.split) or {name: 1.0 for name in config.variants}
    return normalized_split(split)


def cmd_loadtest(args: argparse.Namespace) -> int:
    # First: importing locust patches this process for gevent, before ssl or threads exist.
    from slimserve.loadtests.load_run import LoadSpec, run_load
    from slimserve.loadtests.load_stats import summarize, summary_table

    spec = LoadSpec(
        url=args.url,
        model=args.model,
        endpoint=args.endpoint,
        users=args.users,
        rate=args.rate,
        arrival=args.arrival,
        burstiness=args.burstiness,
        requests=args.requests,
        seconds=args.seconds,
        max_tokens=args.max_tokens,
        prompt_words=args.prompt_words,
        length_spread=args.length_spread,
        trace=args.trace,
        trace_timing=args.trace_timing,
        records=args.records,
    )
    result = run_load(spec, progress=True, web_ui_port=args.web_ui)
    summary = summarize(result.records, result.seconds, _slo(args) if args.slo else None)
    summary.interrupted = result.interrupted
    Path(f"{args.records}.summary.json").write_text(summary.model_dump_json(indent=2))
    print(summary_table(summary))
    log.info("records in %s, summary in %s.summary.json", args.records, args.records)
    return 130 if result.interrupted else 0


class Sweeper:
    """Runs the load of one sweep point against a pinned variant and keeps its records."""

    def __init__(self, url: str, model: str, args: argparse.Namespace, out: Path) -> None:
        self.url, self.model, self.args, self.out = url, model, args, out
        self.records: dict[tuple[str, float], list[dict[str, Any]]] = {}

    def spec(self, kind: str, load: float, records: Path) -> LoadSpec:
        from slimserve.loadtests.load_run import LoadSpec

        common = {
            "url": self.url,
            "model": self.model,
            "endpoint": self.args.endpoint,
            "max_tokens": self.args.max_tokens,
            "prompt_words": self.args.prompt_words,
            "records": records,
        }
        if kind == "concurrency":
            return LoadSpec(**common, users=round(load), seconds=self.args.run_seconds)
        requests = max(self.args.min_requests, math.ceil(load * self.args.run_seconds))
        return LoadSpec(
            **common,
            users=OPEN_LOOP_USERS,
            rate=load,
            requests=requests,
            seconds=requests / load + self.args.run_seconds * 2,
        )

    def __call__(self, kind: str, load: float) -> SweepPoint:
        from slimserve.loadtests.load_run import run_load
        from slimserve.loadtests.load_stats import summarize
        from slimserve.loadtests.plan_report import write_records_csv
        from slimserve.loadtests.planner import SweepPoint

        variant = self.model.rsplit(":", 1)[-1]
        name = f"runs/{variant}-{kind}-{load:.4g}"
        result = run_load(self.spec(kind, load, self.out / f"{name}.jsonl"), progress=True)
        if result.interrupted:
            raise KeyboardInterrupt
        write_records_csv(result.records, self.out / f"{name}.csv")
        self.records[(kind, load)] = result.records
        summary = summarize(result.records, result.seconds, _slo(self.args))
        log.info(
            "%s %s=%.4g: %.3f req/s, TTFT p95 %s s, attainment %.1f%%",
            variant,
            kind,
            load,
            summary.request_rate,
            f"{summary.ttft.p95:.3f}" if summary.ttft.p95 is not None else "-",
            100 * summary.attainment.fraction if summary.attainment else 0.0,
        )
        return SweepPoint(kind=kind, load=load, summary=summary, records_file=f"{name}.csv")


def _replica_memory(url: str, variant: str) -> int | None:
    import httpx

    stats = httpx.get(f"{url}/v1/variants", timeout=30).json()["variants"].get(variant) or {}
    return (stats.get("memory") or {}).get("rss_bytes")


def sweep_variant(
    url: str, config: SlimserveConfig, variant: str, args: argparse.Namespace, out: Path
) -> tuple[VariantCapacity, list[dict[str, Any]]]:
    """Knee, then the highest rate within the SLO, of one variant pinned by model name; returns
    its capacity and the records of its best run within the SLO."""
    from slimserve.loadtests.load_run import run_load
    from slimserve.loadtests.planner import capacity_from_sweep, find_knee, find_slo_rate

    settings = _settings(args)
    sweeper = Sweeper(url, f"{config.public_model_name}:{variant}", args, out)
    warm = sweeper.spec("concurrency", 1, out / "runs" / f"{variant}-warmup.jsonl")
    run_load(warm.model_copy(update={"requests": 2}), progress=False)
    knee_points, knee = find_knee(sweeper, settings)
    start = max(settings.min_rate, knee.summary.request_rate / 2)
    rate_points, best = find_slo_rate(sweeper, start, settings)
    capacity = capacity_from_sweep(
        variant,
        knee_points,
        knee,
        rate_points,
        best,
        args.replica_cpus or os.cpu_count() or 1,
        _replica_memory(url, variant),
    )
    records = [] if best is None else sweeper.records[("rate", best.load)]
    return capacity, records


def _settings(args: argparse.Namespace) -> SweepSettings:
    from slimserve.loadtests.planner import SweepSettings

    return SweepSettings(
        max_concurrency=args.max_concurrency,
        bisect_steps=args.bisect_steps,
        min_rate=args.min_rate,
    )


def make_plan(
    config: SlimserveConfig, config_path: str, args: argparse.Namespace, out: Path
) -> tuple[PlanReport, dict[str, list[dict[str, Any]]]]:
    from slimserve.loadtests.plan_report import Machine, PlanReport, now, totals
    from slimserve.loadtests.planner import plan_variant

    split = _parse_split(args.split, config)
    measured = [name for name, share in split.items() if share > 0]
    capacities: dict[str, VariantCapacity] = {}
    records: dict[str, list[dict[str, Any]]] = {}

    def sweep_all(url: str) -> None:
        for variant in measured:
            log.info("sweeping variant %s", variant)
            capacities[variant], records[variant] = sweep_variant(url, config, variant, args, out)

    if args.url:
        sweep_all(args.url)
    else:
        with gateway_process(Path(config_path), out / "gateway-sweep.log") as url:
            sweep_all(url)
    price = (
        args.price_per_replica_hour
        if args.price_per_replica_hour is not None
        else config.cost.dollars_per_replica_hour
    )
    slo = _slo(args)
    plans = [
        plan_variant(
            capacities[name],
            share,
            args.target_rate,
            slo,
            args.headroom,
            config.cost.per_variant.get(name, price),
        )
        for name, share in split.items()
        if share > 0
    ]
    mean_tokens = sum(p.share * capacities[p.variant].mean_output_tokens for p in plans)
    report = PlanReport(
        created=now(),
        machine=Machine.this_one(),
        config=config_path,
        public_model=config.public_model_name,
        slo=slo,
        target_rate=args.target_rate,
        split=split,
        headroom=args.headroom,
        dollars_per_replica_hour=price,
        load={
            "endpoint": args.endpoint,
            "max_tokens": args.max_tokens,
            "prompt_words": args.prompt_words,
            "run_seconds": args.run_seconds,
        },
        capacities=capacities,
        plans=plans,
        totals=totals(plans, args.target_rate, mean_tokens),
    )
    return report, records


def validate_plan(
    report: PlanReport, config_file: Path, args: argparse.Namespace, out: Path
) -> Validation:
    """Deploy the recommended config, drive the target rate through the public name (so the
    gateway's split routes it) and check every SLO and the split."""
    from slimserve.loadtests.load_run import LoadSpec, run_load
    from slimserve.loadtests.planner import check_validation

    requests = max(args.min_requests, math.ceil(report.target_rate * args.validate_seconds))
    available = os.cpu_count() or 1
    if report.totals.cpus > available:
        log.warning(
            "the plan needs %.0f CPUs (each replica as many as it had while measured); this "
            "machine has %d: the validation runs under-provisioned",
            report.totals.cpus,
            available,
        )
    with gateway_process(config_file, out / "gateway-validate.log") as url:
        base = LoadSpec(
            url=url,
            model=report.public_model,
            endpoint=report.load.endpoint,
            max_tokens=report.load.max_tokens,
            prompt_words=report.load.prompt_words,
            users=OPEN_LOOP_USERS,
            records=out / "runs" / "validate-warmup.jsonl",
        )
        run_load(base.model_copy(update={"users": 1, "requests": 2}), progress=False)
        spec = base.model_copy(
            update={
                "rate": report.target_rate,
                "requests": requests,
                "seconds": requests / report.target_rate + args.run_seconds * 2,
                "records": out / "runs" / "validate.jsonl",
                "seed": 1,
            }
        )
        result = run_load(spec, progress=True)
    from slimserve.loadtests.plan_report import write_records_csv

    write_records_csv(result.records, out / "runs" / "validate.csv")
    return check_validation(
        result.records,
        report.split,
        report.slo,
        report.target_rate,
        result.seconds,
        needed_cpus=report.totals.cpus,
        available_cpus=available,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    # First: importing locust patches this process for gevent, before ssl or threads exist.
    import slimserve.loadtests.load_run  # noqa: F401
    from slimserve.loadtests.plan_report import PlanReport, write_report

    if args.compare:
        from slimserve.loadtests.plan_compare import compare_table

        a, b = (PlanReport.model_validate_json(Path(p).read_text()) for p in args.compare)
        print(compare_table(a, b, *args.compare))
        return 0
    if args.config is None or (args.target_rate is None and args.from_report is None):
        raise SystemExit("slimserve plan: CONFIG and --target-rate are needed (or --compare)")
    from slimserve.serve.config import load_config

    config = load_config(args.config)
    source = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    records: dict[str, list[dict[str, Any]]] = {}
    if args.from_report:
        report = PlanReport.model_validate_json(Path(args.from_report).read_text())
    else:
        report, records = make_plan(config, args.config, args, out)
    files = write_report(report, out, source, records)
    for plan in report.plans:
        log.info(
            "%s: %.3f req/s -> %d replica(s) (queueing %d, measured %d), $%.3f/h",
            plan.variant,
            plan.request_rate,
            plan.replicas,
            plan.replicas_by_queueing,
            plan.replicas_by_measurement,
            plan.dollars_per_hour,
        )
    if args.validate:
        report.validation = validate_plan(report, files["config"], args, out)
        write_report(report, out, source, records)
        for check in report.validation.variants:
            log.info(
                "%s: %d requests, share %.1f%% (expected %.1f%%), TTFT p95 %s s, %s",
                check.variant,
                check.requests,
                100 * check.observed_share,
                100 * check.expected_share,
                "-" if check.ttft_p95_seconds is None else f"{check.ttft_p95_seconds:.3f}",
                "held" if check.held else "MISSED",
            )
        verdict = "every SLO held" if report.validation.held else "the plan did not hold"
        log.info("validation: %s (split p=%s)", verdict, report.validation.split_p_value)
    log.info("report in %s (and %s)", files["report"], files["html"])
    return 0 if report.validation is None or report.validation.held else 1


def _load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    parser.add_argument("--slo-itl", type=float, default=0.2, help="seconds")
    parser.add_argument("--slo-quantile", type=float, default=0.95)


def register_commands(commands: Any) -> None:
    loadtest = commands.add_parser("loadtest", help="one load run against a gateway (locust)")
    loadtest.add_argument("--url", default="http://127.0.0.1:8000")
    loadtest.add_argument("--model", default="smollm2-135m-instruct", help="or NAME:variant")
    loadtest.add_argument("--users", type=int, default=8, help="streams (closed loop)")
    loadtest.add_argument("--rate", type=float, default=0.0, help="arrivals/s (open loop)")
    loadtest.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    loadtest.add_argument("--burstiness", type=float, default=1.0)
    loadtest.add_argument("--requests", type=int, default=0, help="0: bounded by --seconds")
    loadtest.add_argument("--seconds", type=float, default=60.0)
    loadtest.add_argument("--length-spread", type=float, default=0.0)
    loadtest.add_argument("--trace", type=Path, help="JSONL of requests to replay")
    loadtest.add_argument("--trace-timing", action="store_true")
    loadtest.add_argument("--records", type=Path, default=Path("loadtest-records.jsonl"))
    loadtest.add_argument("--slo", action="store_true", help="report attainment of the SLO")
    loadtest.add_argument("--web-ui", type=int, metavar="PORT", help="also serve locust's UI")
    _load_options(loadtest)
    loadtest.set_defaults(func=cmd_loadtest)

    plan = commands.add_parser("plan", help="sweep, recommend a fleet, validate it")
    plan.add_argument("config", nargs="?", help="slimserve config of the variants")
    plan.add_argument("--target-rate", type=float, help="total requests/s to plan for")
    plan.add_argument("--split", help="variant=weight,... (default: the config's split)")
    plan.add_argument("--headroom", type=float, default=0.2, help="fleet share kept idle")
    plan.add_argument("--price-per-replica-hour", type=float, help="default: config cost")
    plan.add_argument("--out", default="plan", help="directory of the report")
    plan.add_argument("--url", help="sweep this running gateway instead of starting one")
    plan.add_argument(
        "--replica-cpus",
        type=float,
        help="cores a replica had while swept (default: this machine's, where the gateway runs)",
    )
    plan.add_argument("--max-concurrency", type=int, default=32)
    plan.add_argument("--bisect-steps", type=int, default=3)
    plan.add_argument("--min-rate", type=float, default=0.01)
    plan.add_argument("--run-seconds", type=float, default=20.0, help="per sweep point")
    plan.add_argument("--min-requests", type=int, default=30, help="per open-loop run")
    plan.add_argument("--validate", action="store_true", help="deploy the plan and check it")
    plan.add_argument("--validate-seconds", type=float, default=60.0)
    plan.add_argument("--from-report", help="validate this report.json instead of sweeping")
    plan.add_argument("--compare", nargs=2, metavar="REPORT", help="two report.json side by side")
    _load_options(plan)
    plan.set_defaults(func=cmd_plan)
