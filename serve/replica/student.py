"""A variant's distilled-student swap: find (or distill, once per machine) the student, check
that it tokenizes and templates like the model it replaces, and serve it in its place."""

from __future__ import annotations

import logging
from pathlib import Path

from filelock import FileLock

from slimserve.distill.config import DistillConfig, load_distill_config
from slimserve.models.store import resolve_model

from ..config import SlimserveConfig

log = logging.getLogger(__name__)


class StudentError(ValueError):
    """The student cannot stand in for the served model (and why)."""


def _distilled(config: DistillConfig, teacher: str) -> Path:
    from slimserve.distill.run import distill, output_dir

    if resolve_model(config.teacher) != teacher:
        raise StudentError(
            f"the student's teacher is {config.teacher!r}, not the model this config serves"
        )
    out = output_dir(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):  # one replica distills; the others wait and reuse it
        report = distill(config, progress=False)
    if not report.finished:
        raise StudentError(f"distillation into {out} stopped at step {report.steps}")
    return out


def check_student(teacher: str, student: str | Path) -> None:
    from transformers import AutoTokenizer

    from slimserve.distill.student import same_tokenizer

    if not (Path(student) / "config.json").is_file():
        raise StudentError(f"no model at {student}")
    reason = same_tokenizer(
        AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    )
    if reason is not None:
        raise StudentError(f"student {student} cannot replace {teacher}: {reason}")


def with_student(cfg: SlimserveConfig, variant: str) -> SlimserveConfig:
    """The config with the variant's student as its model (unchanged without a student)."""
    spec = cfg.variants[variant].student
    if spec is None:
        return cfg
    teacher = resolve_model(cfg.model)
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
        spec = load_distill_config(spec)
    path = _distilled(spec, teacher) if isinstance(spec, DistillConfig) else Path(spec)
    check_student(teacher, path)
    log.info("variant %s serves the student in %s", variant, path)
    swapped = cfg.model_copy(deep=True)
    swapped.variants[variant] = swapped.variants[variant].model_copy(
        update={"model": str(path), "student": None}
    )
    return swapped
