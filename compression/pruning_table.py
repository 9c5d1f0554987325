"""Measure the pruning and low-rank methods on one model and print markdown tables.

    python -m slimserve.compression.pruning_table [--model smollm2-135m-instruct] [--threads N]

Quality rows: a fresh copy of the model, compressed by one spec (timed), then perplexity on the
held-out split. Speed rows: decode tokens/s through the serving runner (LlamaRunner) at batch 1
and 8, every variant measured round-robin in the same process so load from other work on the
machine hits them alike. Last, the artifact cache: int8 compress-on-load (miss) and reload (hit).
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import TypeAdapter

from .evaluation import evaluation_ids, perplexity
from .registry import apply_compression
from .report import resident_weight_bytes
from .specs import CompressionSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    label: str
    spec: dict
    speed: bool = False  # measure decode tokens/s
    same_weights_as: str | None = None  # reuse that row's PPL (identical values, other layout)


# Structured rows keep counts uniform across layers (the runner needs it).
CASES: list[Case] = [
    Case("magnitude 50%", {"method": "magnitude", "sparsity": 0.5}),
    Case("Wanda 50%", {"method": "wanda", "sparsity": 0.5}),
    Case("SparseGPT 50%", {"method": "sparsegpt", "sparsity": 0.5}),
    Case("magnitude 2:4", {"method": "magnitude", "sparsity": "2:4", "pack": False}),
    Case("Wanda 2:4", {"method": "wanda", "sparsity": "2:4", "pack": False}),
    Case("SparseGPT 2:4", {"method": "sparsegpt", "sparsity": "2:4", "pack": False}),
    Case(
        "Wanda 2:4 packed (SparseLinear)",
        {"method": "wanda", "sparsity": "2:4"},
        same_weights_as="Wanda 2:4",
    ),
    Case("layers -4 (angular)", {"method": "prune-layers", "remove": 4}, speed=True),
    Case(
        "layers -4 (perplexity)",
        {
            "method": "prune-layers",
            "remove": 4,
            "importance": "perplexity",
            "calibration": {"samples": 8, "seq_len": 256},
        },
        speed=True,
    ),
    Case("KV groups 3 -> 2", {"method": "prune-heads", "keep_kv_heads": 2}, speed=True),
    Case("heads/group 3 -> 2", {"method": "prune-heads", "keep_heads_per_group": 2}, speed=True),
    Case("FFN 1536 -> 1152", {"method": "prune-ffn", "keep_fraction": 0.75}, speed=True),
    Case(
        "low-rank MLP r=256 (SVD)",
        {"method": "low-rank", "rank": 256, "activation_aware": False},
        speed=True,
    ),
    Case("low-rank MLP r=256 (whitened)", {"method": "low-rank", "rank": 256}, speed=True),
]


@dataclass
class Row:
    label: str
    spec: dict
    megabytes: float
    ppl: float
    seconds: float
    detail: str = ""
    # batch -> [(wall tok/s, tok/s per CPU second of this thread)] over the repeats
    speed: dict[int, list[tuple[float, float]]] = field(default_factory=dict)


def _detail(report) -> str:
    detail = report.methods[0].detail
    parts = []
    if "achieved_sparsity" in detail:
        parts.append(f"sparsity {detail['achieved_sparsity']:.3f}")
    for key in ("removed_layers", "heads", "kv_heads", "intermediate_size", "mean_rank"):
        if key in detail:
            parts.append(f"{key.replace('_', ' ')} {detail[key]}")
    return "; ".join(parts)


@torch.inference_mode()
def decode_tokens_per_second(
    model, batch: int, steps: int, prompt: list[int]
) -> tuple[float, float]:
    """Prefill `prompt` into `batch` slots, time `steps` batched decode steps.

    Returns (tokens per wall second, tokens per CPU second of this thread). With one torch
    thread all the work runs on this thread, and its CPU time is what the decode cost, mostly
    unaffected by other processes competing for the cores.
    """
    from slimserve.models.llama_runner import LlamaRunner

    runner = LlamaRunner(model, max_slots=batch, max_len=len(prompt) + steps + 8)
    for slot in range(batch):
        runner.prefill(slot, prompt, 0, want_logits=False)
    tokens = [prompt[-1]] * batch
    runner.decode(tokens, [len(prompt)] * batch)  # warm-up
    wall, cpu = time.perf_counter(), time.thread_time()
    for step in range(1, steps + 1):
        logits = runner.decode(tokens, [len(prompt) + step] * batch)
        tokens = logits.argmax(-1).tolist()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return batch * steps / wall, batch * steps / cpu


def _measure(case: Case | None, reference, eval_ids, args, done: dict[str, Row]):
    model = reference if case is None else copy.deepcopy(reference)
    label = "full (bf16)" if case is None else case.label
    seconds, detail = 0.0, ""
    if case is not None:
        parsed = TypeAdapter(CompressionSpec).validate_python(case.spec)
        parsed.check_model(model.config)
        started = time.perf_counter()
        report = apply_compression(model, [parsed])
        seconds = time.perf_counter() - started
        detail = _detail(report)
        log.info("%s: %s %s", label, report.summary(), detail)
    if case is not None and case.same_weights_as in done:
        ppl = done[case.same_weights_as].ppl
    else:
        ppl = perplexity(model, eval_ids, context=args.context, stride=args.stride)
    log.info("%s: ppl %.3f", label, ppl)
    megabytes = resident_weight_bytes(model) / 1e6
    return Row(label, case.spec if case else {}, megabytes, ppl, seconds, detail), model


def _speed_round_robin(models: dict[str, torch.nn.Module], rows: dict[str, Row], args, prompt):
    labels = list(models)
    for repeat in range(args.repeats):
        order = labels[repeat % len(labels) :] + labels[: repeat % len(labels)]  # rotate
        for batch in (1, 8):
            for label in order:
                rates = decode_tokens_per_second(models[label], batch, args.decode_steps, prompt)
                rows[label].speed.setdefault(batch, []).append(rates)
                log.info(
                    "repeat %d batch %d %s: %.1f tok/s wall, %.1f tok/CPU-s",
                    repeat,
                    batch,
                    label,
                    *rates,
                )


def _median(rates: list[tuple[float, float]], which: int) -> float:
    return statistics.median(rate[which] for rate in rates)


def _quality_table(rows: list[Row]) -> str:
    full = rows[0].ppl
    lines = [
        "| variant | spec | weights MB | PPL | ΔPPL | compress s | detail |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        spec = ", ".join(f"{k}: {v}" for k, v in r.spec.items()) or "-"
        delta = f"{100 * (r.ppl / full - 1):+.1f}%" if r.spec else "-"
        lines.append(
            f"| {r.label} | `{spec}` | {r.megabytes:.1f} | {r.ppl:.3f} | {delta} | "
            f"{r.seconds:.1f} | {r.detail or '-'} |"
        )
    return "\n".join(lines)


def _speed_table(rows: list[Row]) -> str:
    base = rows[0]
    lines = [
        "| variant | PPL | ΔPPL | batch 1 tok/CPU-s | speed-up | batch 8 tok/CPU-s | speed-up "
        "| batch 1 / 8 wall tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.speed:
            continue
        cells = []
        for batch in (1, 8):
            rate = _median(r.speed[batch], 1)
            cells += [f"{rate:.1f}", f"{rate / _median(base.speed[batch], 1):.2f}x"]
        wall = f"{_median(r.speed[1], 0):.1f} / {_median(r.speed[8], 0):.1f}"
        delta = f"{100 * (r.ppl / base.ppl - 1):+.1f}%" if r.spec else "-"
        lines.append(f"| {r.label} | {r.ppl:.3f} | {delta} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def _bars(rows: list[Row], cache: dict[str, float] | None) -> list[str]:
    by = {r.label: r for r in rows}
    out = []

    def check(text: str, ok: bool) -> None:
        out.append(f"- [{'x' if ok else ' '}] {text}")

    for sparsity in ("50%", "2:4"):
        wanda, magnitude = by.get(f"Wanda {sparsity}"), by.get(f"magnitude {sparsity}")
        if wanda and magnitude:
            check(
                f"Wanda {sparsity} (PPL {wanda.ppl:.3f}) beats magnitude {sparsity} "
                f"(PPL {magnitude.ppl:.3f})",
                wanda.ppl < magnitude.ppl,
            )
    base = rows[0]
    for r in rows[1:]:
        if r.speed and r.spec.get("method", "").startswith("prune-"):
            gains = [_median(r.speed[b], 1) / _median(base.speed[b], 1) for b in (1, 8)]
            check(
                f"{r.label}: decode {gains[0]:.2f}x (batch 1) / {gains[1]:.2f}x (batch 8) "
                f"for {100 * (r.ppl / base.ppl - 1):+.1f}% PPL",
                min(gains) > 1.0,
            )
    if cache:
        check(f"int8 compress-on-load under 15 s ({cache['miss']:.1f} s)", cache["miss"] < 15)
        check(f"cached int8 reload under 5 s ({cache['hit']:.1f} s)", cache["hit"] < 5)
    return out


def _cache_timings(model_name: str, dtype: str) -> dict[str, float]:
    from .artifact_cache import load_or_compress

    specs = [TypeAdapter(CompressionSpec).validate_python({"method": "int8-weight-only"})]
    timings = {}
    with tempfile.TemporaryDirectory() as scratch:
        for expected in ("miss", "hit"):
            started = time.perf_counter()
            model, _, _, status = load_or_compress(model_name, specs, dtype, Path(scratch))
            timings[status] = time.perf_counter() - started
            assert status == expected, (status, expected)
            del model
            gc.collect()
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU-time speeds are exact)"
    )
    parser.add_argument("--eval-tokens", type=int, default=12_288, help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="round-robin speed repeats")
    parser.add_argument("--only", nargs="*", help="row labels (substrings) to run")
    parser.add_argument("--skip-cache", action="store_true", help="skip the cache timings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from slimserve.models.store import load_model_and_tokenizer

    started = time.perf_counter()
    reference, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    # After one plain load, so module imports (paid once per replica anyway) are not timed.
    cache = None if args.skip_cache else _cache_timings(args.model, args.dtype)
    eval_ids = evaluation_ids(tokenizer, max_tokens=args.eval_tokens + 1)
    prompt = eval_ids[0, :64].tolist()
    selected = [
        case
        for case in CASES
        if not args.only or any(part.lower() in case.label.lower() for part in args.only)
    ]
    rows: list[Row] = []
    done: dict[str, Row] = {}
    fast: dict[str, torch.nn.Module] = {}
    for case in [None, *selected]:
        row, model = _measure(case, reference, eval_ids, args, done)
        rows.append(row)
        done[row.label] = row
        if case is None or case.speed:
            fast[row.label] = model
        else:
            del model
            gc.collect()
    by_label = {r.label: r for r in rows}
    _speed_round_robin(fast, by_label, args, prompt)
    total = time.perf_counter() - started
    print(_quality_table(rows))
    print()
    print(_speed_table(rows))
    print()
    print(
        f"{args.model}, {args.dtype}; PPL: {eval_ids.shape[1] - 1} held-out tokens (pydoc "
        f"evaluation split), context {args.context}, stride {args.stride}; calibration: pydoc "
        f"calibration split, 32 x 256 tokens unless the spec says otherwise. Decode: "
        f"LlamaRunner, 64-token prompt, {args.decode_steps} steps, median of {args.repeats} "
        f"rotated round-robin repeats; tok/CPU-s = tokens per CPU second of the decoding "
        f"thread. torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}; whole run {total:.0f} s."
    )
    if cache:
        print(
            f"Artifact cache (int8-weight-only): miss {cache['miss']:.1f} s, "
            f"hit {cache['hit']:.1f} s"
        )
    print()
    print("\n".join(_bars(rows, cache)))


if __name__ == "__main__":
    main()
