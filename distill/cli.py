"""`slimserve distill CONFIG`: distill a student (resuming a stopped run) and print its report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cmd_distill(args: argparse.Namespace) -> int:
    from .config import load_distill_config
    from .run import distill, output_dir

    config = load_distill_config(args.config)
    if args.output is not None:
        config.output = Path(args.output)
    report = distill(config)
    if not report.finished:
        log.warning(
            "stopped at step %d of %d; run the same command to continue",
            report.steps,
            config.train.steps,
        )
        return 130
    recovered = report.recovered_fraction()
    log.info(
        "student in %s: %d of %d blocks, perplexity %.3f (teacher %.3f, layers dropped %.3f%s), "
        "decode %.1f tok/s (teacher %.1f)",
        output_dir(config),
        report.student.blocks,
        report.teacher.blocks,
        report.student.perplexity,
        report.teacher.perplexity,
        report.layer_dropped.perplexity,
        "" if recovered is None else f", {recovered:.0%} of the lost nats recovered",
        report.student.decode_tokens_per_second,
        report.teacher.decode_tokens_per_second,
    )
    return 0


def register_commands(commands: Any) -> None:
    parser = commands.add_parser("distill", help="distill a student from a teacher")
    parser.add_argument("config", help="YAML of a distill config (see distill/README.md)")
    parser.add_argument("--output", help="write the student here (default: the cache)")
    parser.set_defaults(func=cmd_distill)
