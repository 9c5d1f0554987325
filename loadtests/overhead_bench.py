"""What the serving path costs: one variant's streamed requests in-process and through the
gateway, in alternating rounds, against the gateway's overhead goals.

    python -m slimserve.loadtests.overhead_bench --config deploy/configs/default.yaml \
        --variant full --rounds 3

Each round measures the variant in-process (a VariantServer built in this process, its engine in
its own process as in a replica: engine_bench) and through `slimserve serve CONFIG`, started by
this tool on a free port (decode_bench, over HTTP), one after the other and never at once.
Rounds alternate which path goes first, because a small host's speed drifts by several percent
within minutes; the verdict takes, for each goal, the median over rounds of the per-round
comparison. The loads: short answers at one stream (TTFT), longer ones at one stream (the
inter-token latency), and the given stream counts (output tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import httpx
import yaml
from pydantic import BaseModel

from slimserve.serve.config import load_config, parse_config
from slimserve.serve.logs import configure_logging
from slimserve.serve.ports import free_port
from slimserve.serve.replica.server import VariantServer

from .cpu_servers import running, slimserve_spec
from .cpu_servers_bench import wait_for_quiet
from .decode_bench import BenchRow, bench_variant
from .engine_bench import bench

log = logging.getLogger("slimserve.loadtests.overhead_bench")

# The goals: through the gateway, TTFT p50 at one stream at most this many ms over in-process,
# inter-token latency at one stream within this factor, output tokens/s at least this share.
TTFT_OVERHEAD_MS = 5.0
ITL_FACTOR = 1.05
THROUGHPUT_SHARE = 0.9

# Before each path is measured, what else runs (a gateway's start-up, the last path's exit) may
# keep the CPUs at most this busy, waited for up to QUIET_TIMEOUT_S.
QUIET_BUSY = 0.15
QUIET_TIMEOUT_S = 120.0

SHORT = "one stream, short answers"
LONG = "one stream"


class Load(BaseModel):
    """One measured load: streams, tokens a request, requests each stream sends."""

    name: str
    concurrency: int
    tokens: int
    requests_per_stream: int

    @property
    def requests(self) -> int:
        return self.concurrency * self.requests_per_stream


class Round(BaseModel):
    index: int
    first: Literal["in-process", "gateway"]  # which path ran first
    in_process: dict[str, BenchRow]  # load name -> figures
    gateway: dict[str, BenchRow]


class Goal(BaseModel):
    """One goal's per-round values and their median."""

    what: str
    target: str
    values: list[float]
    median: float
    met: bool


def loads(args: argparse.Namespace) -> list[Load]:
    levels = [
        Load(
            name=SHORT,
            concurrency=1,
            tokens=args.short_tokens,
            requests_per_stream=args.short_requests,
        ),
        Load(name=LONG, concurrency=1, tokens=args.tokens, requests_per_stream=args.long_requests),
    ]
    levels += [
        Load(
            name=f"{streams} streams",
            concurrency=streams,
            tokens=args.tokens,
            requests_per_stream=args.requests_per_stream,
        )
        for streams in args.concurrency
    ]
    return levels


def goals(rounds: list[Round], measured: list[Load]) -> list[Goal]:
    """Each goal over the rounds: TTFT overhead and inter-token latency at one stream, output
    tokens/s at each higher stream count."""

    def goal(what: str, target: str, values: list[float], met: Callable[[float], bool]) -> Goal:
        median = statistics.median(values)
        return Goal(what=what, target=target, values=values, median=median, met=met(median))

    out = [
        goal(
            f"TTFT p50 overhead, ms ({SHORT})",
            f"< {TTFT_OVERHEAD_MS:g}",
            [r.gateway[SHORT].ttft_p50_ms - r.in_process[SHORT].ttft_p50_ms for r in rounds],
            lambda median: median < TTFT_OVERHEAD_MS,
        ),
        goal(
            f"inter-token latency, gateway / in-process ({LONG})",
            f"<= {ITL_FACTOR:g}",
            [
                r.in_process[LONG].per_stream_tokens_per_s / r.gateway[LONG].per_stream_tokens_per_s
                for r in rounds
            ],
            lambda median: median <= ITL_FACTOR,
        ),
    ]
    for load in measured:
        if load.concurrency > 1:
            out.append(
                goal(
                    f"output tok/s, gateway / in-process ({load.name})",
                    f">= {THROUGHPUT_SHARE:g}",
                    [
                        r.gateway[load.name].output_tokens_per_s
                        / r.in_process[load.name].output_tokens_per_s
                        for r in rounds
                    ],
                    lambda median: median >= THROUGHPUT_SHARE,
                )
            )
    return out


async def _in_process(
    server: VariantServer, variant: str, measured: list[Load]
) -> dict[str, BenchRow]:
    """Every load on one event loop (engine_bench.bench's reason), each after a warm-up request
    as decode_bench gives each load through the gateway."""
    rows: dict[str, BenchRow] = {}
    for load in measured:
        (rows[load.name],) = await bench(
            server, variant, [load.concurrency], load.requests_per_stream, load.tokens
        )
    return rows


def measure_in_process(
    config_path: Path, variant: str, measured: list[Load]
) -> dict[str, BenchRow]:
    config = load_config(config_path).model_dump(mode="json")
    server = VariantServer(variant, config)
    try:
        wait_for_quiet(QUIET_BUSY, QUIET_TIMEOUT_S)
        return asyncio.run(_in_process(server, variant, measured))
    finally:
        server.engine.shutdown()


async def _through_gateway(url: str, variant: str, measured: list[Load]) -> dict[str, BenchRow]:
    async with httpx.AsyncClient() as client:
        public = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
    rows: dict[str, BenchRow] = {}
    for load in measured:
        rows[load.name] = await bench_variant(
            url, f"{public}:{variant}", variant, load.concurrency, load.requests, load.tokens
        )
    return rows


def measure_gateway(
    config_path: Path, variant: str, measured: list[Load], logs: Path
) -> dict[str, BenchRow]:
    with running(slimserve_spec(str(config_path), free_port()), logs) as url:
        wait_for_quiet(QUIET_BUSY, QUIET_TIMEOUT_S)
        return asyncio.run(_through_gateway(url, variant, measured))


def alone(config_path: Path, variant: str, directory: Path) -> Path:
    """A copy of the config serving only `variant` (routing, shadow and canary, which name
    variants, left at their defaults), so the gateway holds nothing the in-process side lacks."""
    data = yaml.safe_load(config_path.read_text())
    if variant not in data["variants"]:
        names = ", ".join(data["variants"])
        raise ValueError(f"config {config_path} has no variant {variant!r} (it has: {names})")
    data["variants"] = {variant: data["variants"][variant]}
    for section in ("routing", "shadow", "canary"):
        data.pop(section, None)
    parse_config(data, source=f"config {config_path} with {variant} alone")
    path = directory / f"{variant}-alone.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def render(rounds: list[Round], measured: list[Load], results: list[Goal]) -> str:
    names = [load.name for load in measured]
    head = "| round | path | " + " | ".join(
        f"{name}: TTFT p50 ms / per-stream tok/s / tok/s" for name in names
    )
    lines = [head + " |", "|---|---|" + "---|" * len(names)]
    for r in rounds:
        order = ("in_process", "gateway") if r.first == "in-process" else ("gateway", "in_process")
        for path in order:
            rows = getattr(r, path)
            cells = [
                f"{rows[n].ttft_p50_ms} / {rows[n].per_stream_tokens_per_s} / "
                f"{rows[n].output_tokens_per_s}"
                for n in names
            ]
            lines.append(f"| {r.index} | {path.replace('_', '-')} | " + " | ".join(cells) + " |")
    lines += ["", "| goal | target | per round | median | met |", "|---|---|---|---|---|"]
    for g in results:
        values = " / ".join(f"{v:.2f}" for v in g.values)
        lines.append(
            f"| {g.what} | {g.target} | {values} | {g.median:.2f} | {'yes' if g.met else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("deploy/configs/default.yaml"))
    parser.add_argument("--variant", default="full")
    parser.add_argument(
        "--alone", action="store_true", help="serve the variant alone, not the config's others"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--short-requests", type=int, default=40)
    parser.add_argument("--long-requests", type=int, default=12)
    parser.add_argument("--requests-per-stream", type=int, default=6)
    parser.add_argument("--log-dir", type=Path, help="the gateway's logs (default: a temp dir)")
    args = parser.parse_args()
    measured = loads(args)
    work = Path(tempfile.mkdtemp(prefix="slimserve-overhead-"))
    logs = args.log_dir or work
    logs.mkdir(parents=True, exist_ok=True)
    config = alone(args.config, args.variant, work) if args.alone else args.config
    rounds = []
    for index in range(1, args.rounds + 1):
        first = "in-process" if index % 2 else "gateway"
        log.info("round %d of %d, %s first", index, args.rounds, first)
        if first == "in-process":
            local = measure_in_process(config, args.variant, measured)
            remote = measure_gateway(config, args.variant, measured, logs)
        else:
            remote = measure_gateway(config, args.variant, measured, logs)
            local = measure_in_process(config, args.variant, measured)
        rounds.append(Round(index=index, first=first, in_process=local, gateway=remote))
        log.info("%s", rounds[-1].model_dump_json())
    print(render(rounds, measured, goals(rounds, measured)))  # the tables are this tool's output


if __name__ == "__main__":
    main()
