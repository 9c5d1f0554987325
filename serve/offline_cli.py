"""`slimserve compress` and `slimserve eval`: compression and quality checks outside the gateway.

    slimserve compress CONFIG_OR_SPEC [--variant NAME] [--output DIR]
    slimserve eval CONFIG [--variant NAME ...]

CONFIG is the gateway YAML; CONFIG_OR_SPEC may also be a small YAML with `model:`,
`compression: [...]` and optionally `dtype:`. `compress` writes the artifact into the cache the
replicas read (or DIR), so a replica's startup becomes a cache hit.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from slimserve.compression.specs import CompressionSpec

log = logging.getLogger(__name__)


@dataclass
class Target:
    variant: str
    model: str
    specs: list[Any]
    dtype: str


def _config_error(message: str) -> Exception:
    from .config import ConfigError

    return ConfigError(message)


def _spec_file(path: Path, data: dict[str, Any]) -> list[Target]:
    unknown = sorted(set(data) - {"model", "compression", "dtype"})
    if unknown or "model" not in data:
        raise _config_error(
            f"{path}: a spec file has `model:`, `compression: [...]` and optionally `dtype:`"
            + (f"; unknown keys {unknown}" if unknown else "; `model` is missing")
        )
    try:
        specs = TypeAdapter(list[CompressionSpec]).validate_python(data.get("compression") or [])
    except ValidationError as error:
        lines = [
            f"  compression.{'.'.join(str(p) for p in item['loc'])}: {item['msg']}"
            for item in error.errors()
        ]
        raise _config_error(f"invalid spec file {path}:\n" + "\n".join(lines)) from None
    dtype = data.get("dtype", "bfloat16")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise _config_error(f"{path}: dtype must be bfloat16, float16 or float32, got {dtype!r}")
    return [Target("spec", str(data["model"]), specs, dtype)]


def load_targets(path: str | Path, variants: list[str] | None = None) -> tuple[str, list[Target]]:
    """The full model's name, and the (variant, model, specs, dtype) to compress, from a
    gateway config or a spec file."""
    from .config import load_config

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise _config_error(f"file not found: {path}") from None
    except yaml.YAMLError as error:
        raise _config_error(f"{path} is not valid YAML: {error}") from None
    if isinstance(data, dict) and "variants" not in data:
        targets = _spec_file(path, data)
        return targets[0].model, targets
    config = load_config(path)
    names = variants or list(config.variants)
    missing = sorted(set(names) - set(config.variants))
    if missing:
        raise _config_error(f"unknown variants {missing}; the config has {list(config.variants)}")
    return config.model, [
        Target(
            name,
            config.model_for(name),
            list(config.variants[name].compression),
            config.engine_for(name).dtype,
        )
        for name in names
    ]


def check_targets(targets: list[Target]) -> None:
    """Run each spec's architecture check (e.g. 2:4 on a dimension not divisible by 4)."""
    from transformers import AutoConfig

    from slimserve.models.store import resolve_model

    for target in targets:
        if not target.specs:
            continue
        model_config = AutoConfig.from_pretrained(resolve_model(target.model))
        for index, spec in enumerate(target.specs):
            try:
                spec.check_model(model_config)
            except ValueError as error:
                raise _config_error(
                    f"variant {target.variant}: compression.{index} ({spec.method}): {error}"
                ) from None


def cmd_compress(args: argparse.Namespace) -> int:
    from slimserve.compression.artifact_cache import load_or_compress

    _, targets = load_targets(args.config, [args.variant] if args.variant else None)
    targets = [t for t in targets if t.specs]
    if not targets:
        log.info("nothing to compress: no selected variant has compression specs")
        return 0
    check_targets(targets)
    for target in targets:
        _, _, report, status = load_or_compress(
            target.model, target.specs, target.dtype, args.output
        )
        print(f"{target.variant} ({target.model}, {target.dtype}): cache {status}")
        print(f"  {report.summary()}")
        for method in report.methods:
            detail = {k: v for k, v in method.detail.items() if k not in ("importance", "ranks")}
            print(f"  {method.method}: {detail}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slimserve.compression.artifact_cache import load_or_compress
    from slimserve.compression.evaluation import compare_to_reference, evaluation_ids, perplexity
    from slimserve.compression.report import resident_weight_bytes

    reference_name, targets = load_targets(args.config, args.variant or None)
    check_targets(targets)
    reference, tokenizer, _, _ = load_or_compress(reference_name, [], targets[0].dtype)
    eval_ids = evaluation_ids(tokenizer, max_tokens=args.eval_tokens + 1)
    compare = eval_ids[0, : args.compare_windows * 256].reshape(-1, 256)
    full_ppl = perplexity(reference, eval_ids, context=args.context, stride=args.stride)
    full_bytes = resident_weight_bytes(reference)
    rows = [("full", reference_name, "-", full_bytes, full_ppl, 1.0, 0.0, "-")]
    for target in targets:
        if not target.specs and target.model == reference_name:
            continue
        model, _, _, status = load_or_compress(
            target.model, target.specs, target.dtype, args.output
        )
        ppl = perplexity(model, eval_ids, context=args.context, stride=args.stride)
        quality = compare_to_reference(model, reference, compare)
        methods = ", ".join(spec.method for spec in target.specs) or "-"
        rows.append(
            (
                target.variant,
                target.model,
                methods,
                resident_weight_bytes(model),
                ppl,
                quality["agreement"],
                quality["kl"],
                status,
            )
        )
        del model
    print("| variant | model | compression | weights MB | PPL | ΔPPL | top-1 agree | KL | cache |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for variant, model, methods, size, ppl, agree, kl, status in rows:
        delta = f"{100 * (ppl / full_ppl - 1):+.2f}%"
        print(
            f"| {variant} | {model} | {methods} | {size / 1e6:.1f} | {ppl:.3f} | {delta} | "
            f"{agree:.4f} | {kl:.4f} | {status} |"
        )
    print(
        f"\nPPL over {eval_ids.shape[1] - 1} held-out tokens (pydoc evaluation split), context "
        f"{args.context}, stride {args.stride}; agreement / KL vs the full model over "
        f"{compare.numel()} tokens."
    )
    return 0


def register_commands(subparsers: Any) -> None:
    """Add `compress` and `eval` to the `slimserve` command line."""
    compress = subparsers.add_parser(
        "compress", help="compress a variant offline and store it in the artifact cache"
    )
    compress.add_argument("config", help="gateway YAML, or a YAML with model: and compression:")
    compress.add_argument("--variant", help="only this variant (default: every compressed one)")
    compress.add_argument(
        "--output", type=Path, default=None, help="cache directory (default: the replicas' cache)"
    )
    compress.set_defaults(func=cmd_compress)

    evaluate = subparsers.add_parser(
        "eval", help="held-out perplexity, next-token agreement and KL vs the full model"
    )
    evaluate.add_argument("config", help="gateway YAML (or a spec file)")
    evaluate.add_argument("--variant", action="append", help="variants to evaluate (repeatable)")
    evaluate.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens scored")
    evaluate.add_argument("--context", type=int, default=512)
    evaluate.add_argument("--stride", type=int, default=256)
    evaluate.add_argument("--compare-windows", type=int, default=8, help="256-token windows")
    evaluate.add_argument("--output", type=Path, default=None, help="artifact cache directory")
    evaluate.set_defaults(func=cmd_eval)
