"""slimserve next to what CPU users would run instead (llama.cpp's llama-server, vLLM for CPU).

    python -m slimserve.loadtests.cpu_servers_bench \\
        --servers llamacpp-f32 llamacpp-bf16 llamacpp-q8_0 llamacpp-q4_1 slimserve \\
        --concurrency 1 8 32 [--isa avx2]

One server after another on the same machine, the same load for each (OpenAI chat completions,
streaming, --tokens greedy tokens per request with ignore_eos, closed loop), and the perplexity
of each row's weights on slimserve's held-out evaluation text. Prints a markdown table.
`--isa avx2` compares at the level of an AVX2-only CPU (AMD Zen 2) on a newer one: llama.cpp
built for AVX2 alone, slimserve (and torch, oneDNN) held to AVX2 by their environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from slimserve.loadtests.cpu_servers import (
    GGUF_TYPES,
    ISA_FLAGS,
    LlamaCpp,
    cmake_flags,
    ensure_gguf,
    ensure_llamacpp,
    llama_server_spec,
    running,
    slimserve_spec,
    vllm_spec,
)
from slimserve.loadtests.decode_bench import (
    PROMPTS,
    BenchRow,
    _one,
    closed_loop,
    streaming_session,
)
from slimserve.models.paths import cache_root
from slimserve.serve.logs import configure_logging
from slimserve.serve.ports import free_port

log = logging.getLogger("slimserve.loadtests.cpu_servers_bench")

MODEL = "smollm2-135m-instruct"
LLAMACPP_SERVERS = {f"llamacpp-{kind}": kind for kind in GGUF_TYPES}
SERVERS = [*LLAMACPP_SERVERS, "slimserve", "vllm"]
# What holds slimserve, torch and oneDNN to a CPU level (kernels/README.md, "Every CPU").
ISA_ENVIRONMENT = {
    "native": {},
    "avx2": {
        "SLIMSERVE_CPU_ISA": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    },
}


class Entry(BaseModel):
    """One table row: a served model, its load results per concurrency, its perplexity."""

    label: str
    request_model: str
    results: list[BenchRow] = []
    perplexity: float | None = None
    load_average: str = "-"  # 1-minute load average right after its load


# Perplexity -------------------------------------------------------------------------------------


def evaluation_text_file() -> Path:
    """slimserve's held-out evaluation text (pydoc, evaluation split) as a file for llama.cpp."""
    from slimserve.compression.calibration import load_text

    path = cache_root() / "llama.cpp" / "pydoc-evaluation.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(load_text("pydoc", "evaluation"))
    return path


def llamacpp_perplexity(llamacpp: LlamaCpp, gguf: Path, args: argparse.Namespace) -> float:
    """llama-perplexity over the first --ppl-tokens tokens: --ppl-context token chunks, each
    scored on its second half."""
    command = [
        str(llamacpp.binary("llama-perplexity")),
        *("-m", str(gguf), "-f", str(evaluation_text_file()), "-t", str(args.threads)),
        *("-c", str(args.ppl_context), "--chunks", str(args.ppl_tokens // args.ppl_context)),
        *llamacpp_options(args),
    ]
    log.info("perplexity of %s with llama-perplexity", gguf.name)
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", result.stdout + result.stderr)
    if found is None:
        raise RuntimeError(f"no final PPL in llama-perplexity's output:\n{result.stderr[-2000:]}")
    return float(found.group(1))


def slimserve_perplexity(config: str, variant: str, args: argparse.Namespace) -> float:
    """slimserve's own evaluation of a config's variant, as served (dtype, compression), over
    the same first --ppl-tokens tokens, windows of --ppl-context every half window."""
    from slimserve.compression.artifact_cache import load_or_compress
    from slimserve.compression.evaluation import evaluation_ids, perplexity
    from slimserve.serve.offline_cli import load_targets

    _, (target,) = load_targets(config, [variant])
    log.info("perplexity of slimserve %s with slimserve's evaluation", variant)
    model, tokenizer, _, _ = load_or_compress(target.model, target.specs, target.dtype)
    ids = evaluation_ids(tokenizer, max_tokens=args.ppl_tokens)
    return perplexity(model, ids, context=args.ppl_context, stride=args.ppl_context // 2)


# Load -------------------------------------------------------------------------------------------


async def bench_entry(
    entry: Entry, url: str, concurrency: int, args: argparse.Namespace
) -> BenchRow:
    """decode_bench's warm-up and closed loop, on a client that opens a new connection per
    request: llama-server may close a streamed response's connection that the client would
    otherwise reuse ("Server disconnected without sending a response")."""
    async with streaming_session(concurrency, keep_alive=False) as session:
        await _one(session, url, entry.request_model, PROMPTS[0], 4)  # warm-up
        return await closed_loop(
            lambda index: _one(
                session, url, entry.request_model, PROMPTS[index % len(PROMPTS)], args.tokens
            ),
            entry.label,
            concurrency,
            args.requests_per_stream * concurrency,
        )


async def load_entries(url: str, entries: list[Entry], args: argparse.Namespace) -> None:
    """The closed-loop load at each concurrency, for each entry, against one running server."""
    for entry in entries:
        for concurrency in args.concurrency:
            row = await bench_entry(entry, url, concurrency, args)
            log.info("%s", row.model_dump_json())
            entry.results.append(row)
        entry.load_average = load_average().split()[0]


def cpu_busy(seconds: float = 3.0) -> float:
    """The fraction of all CPUs' time spent busy over the next `seconds` (/proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(value) for value in Path("/proc/stat").read_text().split()[1:9]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total_before, idle_before = sample()
    time.sleep(seconds)
    total_after, idle_after = sample()
    return 1 - (idle_after - idle_before) / max(1, total_after - total_before)


def wait_for_quiet(most_busy: float, timeout: float) -> None:
    """Before a measurement: wait (up to `timeout` s) until other processes keep the CPUs at most
    `most_busy` busy (a server's start-up, the last one's exit); llama.cpp's threads, one per
    core, slow down many times over when another process takes a core."""
    deadline = time.monotonic() + timeout
    while (busy := cpu_busy()) > most_busy:
        if time.monotonic() > deadline:
            log.warning("CPUs still %.0f%% busy with other work; measuring anyway", 100 * busy)
            return
        log.info("CPUs %.0f%% busy with other work; waiting", 100 * busy)


def llamacpp_options(args: argparse.Namespace) -> list[str]:
    """llama.cpp's options this run adds to its server and perplexity program."""
    return ["--no-repack"] if args.llamacpp_no_repack else []


def measure_llamacpp(kind: str, args: argparse.Namespace) -> list[Entry]:
    llamacpp = ensure_llamacpp(args.jobs, args.isa)
    gguf = ensure_gguf(llamacpp, MODEL, kind)
    options = llamacpp_options(args)
    label = " ".join([f"llama.cpp {kind.upper()}", *options])
    entry = Entry(label=label, request_model=MODEL)
    slots = max(args.concurrency)
    spec = llama_server_spec(
        llamacpp, gguf, f"llamacpp-{kind}", args.port, slots, args.threads, options
    )
    with running(spec, args.log_dir) as url:
        asyncio.run(load_entries(url, [entry], args))
    entry.perplexity = llamacpp_perplexity(llamacpp, gguf, args)
    return [entry]


def measure_slimserve(args: argparse.Namespace) -> list[Entry]:
    entries = [
        Entry(label=f"slimserve {variant}", request_model=f"{MODEL}:{variant}")
        for variant in args.slimserve_variants
    ]
    with running(slimserve_spec(args.slimserve_config, args.port), args.log_dir) as url:
        asyncio.run(load_entries(url, entries, args))
    for entry, variant in zip(entries, args.slimserve_variants, strict=True):
        entry.perplexity = slimserve_perplexity(args.slimserve_config, variant, args)
    return entries


def measure_vllm(args: argparse.Namespace) -> list[Entry]:
    """vLLM serves the same bf16 weights as slimserve's full variant: no perplexity of its own."""
    from slimserve.models.store import resolve_model

    entry = Entry(label="vLLM (bf16)", request_model=MODEL)
    spec = vllm_spec(resolve_model(MODEL), MODEL, args.port, max(args.concurrency))
    with running(spec, args.log_dir) as url:
        asyncio.run(load_entries(url, [entry], args))
    return [entry]


def measure(server: str, args: argparse.Namespace) -> list[Entry]:
    wait_for_quiet(args.quiet_busy, args.quiet_timeout)
    if server in LLAMACPP_SERVERS:
        return measure_llamacpp(LLAMACPP_SERVERS[server], args)
    if server == "slimserve":
        return measure_slimserve(args)
    return measure_vllm(args)


# Table ------------------------------------------------------------------------------------------


def cpu_description() -> str:
    """/proc/cpuinfo's model name and AVX-512 / AMX flags."""
    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
    flags = sorted(
        set(
            re.findall(r"avx512[a-z0-9_]*|amx[a-z0-9_]*", flags_line.group(1) if flags_line else "")
        )
    )
    model = name.group(1).strip() if name else "unknown CPU"
    return f"{model}, {os.cpu_count()} cores; flags: {' '.join(flags) or 'no AVX-512 / AMX'}"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(entries: list[Entry], concurrency: list[int]) -> str:
    top = max(concurrency)
    head = [
        "server",
        *(f"output tok/s c={c}" for c in concurrency),
        f"per-stream tok/s c={top}",
        f"TTFT p50 ms c={top}",
        "PPL",
        "load avg",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for entry in entries:
        by_concurrency = {row.concurrency: row for row in entry.results}
        last = by_concurrency[top]
        cells = [
            entry.label,
            *(_cell(by_concurrency[c].output_tokens_per_s) for c in concurrency),
            _cell(last.per_stream_tokens_per_s),
            _cell(last.ttft_p50_ms),
            "-" if entry.perplexity is None else f"{entry.perplexity:.3f}",
            entry.load_average,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(args: argparse.Namespace, load_before: str, load_after: str) -> str:
    command = "python -m slimserve.loadtests.cpu_servers_bench " + " ".join(sys.argv[1:])
    top = max(args.concurrency)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"Command: `{command}`",
            f"CPU: {cpu_description()}. Date: {now}. Load average (1/5/15 min) before: "
            f"{load_before}, after: {load_after}.",
            f"Load: {args.tokens} output tokens per request (ignore_eos, greedy), streaming chat "
            f"completions, {args.requests_per_stream} requests per stream, closed loop. "
            f"llama-server: `-np {top} -t {args.threads} -c {top * 128}`, built with "
            f"{' '.join(cmake_flags(args.isa))}. Environment of every server: "
            f"{ISA_ENVIRONMENT[args.isa] or 'as the host has it'}.",
            "Weights: llama.cpp F32 converted (convert_hf_to_gguf.py) from the HF directory "
            "slimserve materializes (bf16), BF16 and Q8_0 made from it (llama-quantize), Q4_1 the "
            "GGUF the model ships as (token embeddings Q8_0), which slimserve de-quantizes; "
            "slimserve variants as its config serves them (dtype auto: bf16 where the CPU has "
            "native bf16). Before each server the run waits until other processes keep the CPUs "
            f"under {args.quiet_busy:.0%} busy; load avg: the 1-minute load average right after "
            "the row's load.",
            f"PPL: the first {args.ppl_tokens} tokens of slimserve's held-out text (pydoc, "
            f"evaluation split), context {args.ppl_context}. llama-perplexity scores the second "
            f"half of each non-overlapping {args.ppl_context}-token chunk; slimserve's evaluation "
            f"slides a {args.ppl_context}-token window by {args.ppl_context // 2} and scores every "
            "token once (the first window's early tokens with less context).",
        ]
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers", nargs="+", choices=SERVERS, default=[*LLAMACPP_SERVERS, "slimserve"]
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument(
        "--port", type=int, default=free_port(), help="every server, one at a time (default: free)"
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument(
        "--llamacpp-no-repack",
        action="store_true",
        help="run llama.cpp without its repacked weights (its AMX and interleaved layouts): "
        "0.3.36's AMX path dies with SIGILL at start-up on an Intel Xeon with AMX under KVM",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs building llama.cpp")
    parser.add_argument("--slimserve-config", default="deploy/configs/default.yaml")
    parser.add_argument("--slimserve-variants", nargs="+", default=["full", "int8"])
    parser.add_argument("--quiet-busy", type=float, default=0.2, help="see wait_for_quiet")
    parser.add_argument("--quiet-timeout", type=float, default=300)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--ppl-context", type=int, default=512)
    parser.add_argument("--log-dir", type=Path, default=cache_root() / "llama.cpp" / "logs")
    parser.add_argument("--isa", choices=list(ISA_FLAGS), default="native", help="CPU level")
    return parser.parse_args()


def main() -> None:
    configure_logging()
    args = parse_args()
    # Inherited by every server process (and Ray's workers), and by the perplexity runs here.
    os.environ.update(ISA_ENVIRONMENT[args.isa])
    args.log_dir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    entries = [entry for server in args.servers for entry in measure(server, args)]
    print(header(args, load_before, load_average()))
    print()
    print(render(entries, args.concurrency))


if __name__ == "__main__":
    main()
