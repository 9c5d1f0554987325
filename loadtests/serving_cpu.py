"""Where a token's CPU goes on the serving path: CPU milliseconds per output token of each process
of a running local gateway (Serve's HTTP proxy where one runs, gateway replica, the variant's
replica and its engine process, Ray's own processes) and of this load client, at each
concurrency.

    python -m slimserve.loadtests.serving_cpu --url http://127.0.0.1:8000 --variant full \
        --concurrency 1 8 32

CPU time, unlike tok/s, does not move with what else the host runs, so it compares serving
layers reliably on a shared machine. Each row also gives the variant's MFU as the gateway
exports it right after that load (over its `mfu.window_seconds`, 30 s by default: give each
concurrency enough requests to fill it), which should rise with the streams. The load is
decode_bench's (streaming chat, greedy, ignore_eos, closed loop); run it on the machine the
gateway runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
from collections import defaultdict

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from slimserve.serve.app import APP_NAME, VARIANT_PREFIX
from slimserve.serve.logs import configure_logging

from .decode_bench import bench_variant

log = logging.getLogger("slimserve.loadtests.serving_cpu")

STAGES = ("HTTP proxy", "gateway replica", "variant replica", "engine process", "Ray", "client")
# A local `slimserve serve` runs no Serve proxy (the gateway replica listens itself); a cluster's
# gateway is not measured here. Every other stage must be found.
OPTIONAL_STAGES = ("HTTP proxy",)


class CpuRow(BaseModel):
    concurrency: int
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    ms_per_token: dict[str, float]  # stage -> CPU ms per output token
    mfu: float | None  # the gateway's MFU of the variant right after the load (its window)


def _stage(process: psutil.Process, variant_replica: str) -> str | None:
    """Which serving stage a process is, from its command line (Ray names actor processes)."""
    if process.pid == os.getpid():
        return "client"
    try:
        command = " ".join(process.cmdline())
        parent = process.parent()
        parent_command = " ".join(parent.cmdline()) if parent is not None else ""
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if "ray::ProxyActor" in command:
        return "HTTP proxy"
    if _names(f"ServeReplica:{APP_NAME}:gateway", command):
        return "gateway replica"
    if _names(variant_replica, command):
        return "variant replica"
    if _names(variant_replica, parent_command):
        return "engine process"
    if "ServeReplica" in command or "ServeReplica" in parent_command:
        return None  # another variant: idle in this run, not the path measured
    if command.startswith("ray::") or "/ray/" in command:  # controller, raylet, GCS, agents
        return "Ray"
    return None


def _names(actor: str, command: str) -> bool:
    """Whether a Ray process title is this actor's: "ray::<actor>", or while a call runs,
    "ray::...:<actor>.<method>"."""
    return re.search(re.escape(actor) + r"(\.\w+)?$", command.strip()) is not None


def _cpu_seconds(variant: str) -> dict[int, tuple[str, float]]:
    """pid -> (stage, CPU seconds so far) of every serving process."""
    replica = f"ServeReplica:{APP_NAME}:{VARIANT_PREFIX}{variant}"
    found: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter():
        stage = _stage(process, replica)
        if stage is None:
            continue
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found[process.pid] = (stage, times.user + times.system)
    return found


def _spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]):
    """CPU seconds per stage between two snapshots, over the processes alive at both."""
    spent: dict[str, float] = defaultdict(float)
    for pid, (stage, seconds) in after.items():
        if pid in before:
            spent[stage] += seconds - before[pid][1]
    missing = [stage for stage in STAGES if stage not in spent and stage not in OPTIONAL_STAGES]
    if missing:
        raise RuntimeError(f"no process found for {missing}: is the gateway local and up?")
    return spent


async def measure(url: str, variant: str, concurrency: int, requests: int, tokens: int) -> CpuRow:
    async with httpx.AsyncClient() as client:
        public = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
    before = _cpu_seconds(variant)
    row = await bench_variant(url, f"{public}:{variant}", variant, concurrency, requests, tokens)
    spent = _spent(before, _cpu_seconds(variant))
    mfu = await _mfu(url, variant)
    per_token = {
        stage: round(1000 * spent.get(stage, 0.0) / row.output_tokens, 3) for stage in STAGES
    }
    return CpuRow(
        concurrency=concurrency,
        output_tokens=row.output_tokens,
        output_tokens_per_s=row.output_tokens_per_s,
        ttft_p50_ms=row.ttft_p50_ms,
        ms_per_token=per_token,
        mfu=mfu,
    )


async def _mfu(url: str, variant: str) -> float | None:
    """slimserve_variant_mfu_ratio of `variant` from the gateway's /metrics."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "slimserve_variant_mfu_ratio" and sample.labels["variant"] == variant:
                return sample.value
    return None


def render(rows: list[CpuRow]) -> str:
    head = "| concurrency | output tok/s | TTFT p50 ms | "
    head += " | ".join(STAGES) + " | serving layers | MFU |"
    lines = [head, "|" + "---|" * (len(STAGES) + 5)]
    for row in rows:
        cells = [f"{row.ms_per_token[stage]:.3f}" for stage in STAGES]
        layers = sum(
            row.ms_per_token[s] for s in ("HTTP proxy", "gateway replica", "variant replica")
        )
        lines.append(
            f"| {row.concurrency} | {row.output_tokens_per_s} | {row.ttft_p50_ms} | "
            + " | ".join(cells)
            + f" | {layers:.3f} | {'-' if row.mfu is None else f'{row.mfu:.4f}'} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[CpuRow]:
    rows = []
    for concurrency in args.concurrency:
        requests = max(args.requests_per_stream * concurrency, concurrency)
        cpu_row = await measure(args.url, args.variant, concurrency, requests, args.tokens)
        log.info("%s", cpu_row.model_dump_json())
        rows.append(cpu_row)
    return rows


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--variant", default="full")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=3)
    args = parser.parse_args()
    print(render(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
