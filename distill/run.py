"""`slimserve distill`: make a student from a teacher and write it as a normal Hugging Face
checkpoint (weights, config, tokenizer with its chat template, generation config) with a report.

A run checkpoints every `train.checkpoint_every` steps; running the same config again resumes
from the last checkpoint (a killed run continues where it stopped, on the same data order and
RNG state) and a finished one is reused as it is.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from slimserve.compression.calibration import load_text, token_windows
from slimserve.compression.evaluation import evaluation_ids, perplexity
from slimserve.models.loading import causal_lm_from_pretrained
from slimserve.models.paths import cache_root
from slimserve.models.store import resolve_model

from .config import DistillConfig
from .generations import pack, teacher_sequences
from .student import kept_blocks, make_student, parameter_bytes, parameter_count
from .trainer import DistillationTrainer, StopOnInterrupt, WindowDataset, interrupt_stops

log = logging.getLogger(__name__)

REPORT = "distill-report.json"


class ModelFigures(BaseModel):
    perplexity: float
    parameters: int
    bytes: int
    blocks: int
    decode_tokens_per_second: float


class DistillReport(BaseModel):
    config: DistillConfig
    teacher_path: str
    kept_blocks: list[int]
    steps: int
    finished: bool  # False: stopped early (Ctrl-C); run again to continue
    resumed_from_step: int | None
    train_seconds: float
    windows: int
    losses: list[dict[str, float]]  # the trainer's log lines: step, loss and its parts
    teacher: ModelFigures
    layer_dropped: ModelFigures  # the student before training
    student: ModelFigures | None  # None until finished

    def recovered_fraction(self) -> float | None:
        """Of the held-out loss (nats per token, log perplexity) that dropping layers lost, the
        share training won back. In log space: a dropped model's perplexity can be astronomical,
        and a difference of perplexities would then call any student a full recovery."""
        if self.student is None:
            return None
        teacher, dropped = (
            math.log(self.teacher.perplexity),
            math.log(self.layer_dropped.perplexity),
        )
        if dropped <= teacher:
            return None
        return (dropped - math.log(self.student.perplexity)) / (dropped - teacher)


def output_dir(config: DistillConfig) -> Path:
    return config.output or cache_root() / "students" / config.digest()


@torch.inference_mode()
def decode_speed(model: torch.nn.Module, tokenizer: Any, tokens: int) -> float:
    """Greedy tokens/s at one stream from a short prompt (HF generate, KV cache on)."""
    ids = tokenizer("The history of the lighthouse", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
    started = time.perf_counter()
    out = model.generate(
        ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
    )
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)


def figures(model: torch.nn.Module, tokenizer: Any, config: DistillConfig) -> ModelFigures:
    model.eval()
    ids = evaluation_ids(tokenizer, config.data.source, config.eval.tokens)
    context = min(config.eval.context, ids.shape[1])
    return ModelFigures(
        perplexity=perplexity(model, ids, context=context, stride=max(1, context // 2)),
        parameters=parameter_count(model),
        bytes=parameter_bytes(model),
        blocks=model.config.num_hidden_layers,
        decode_tokens_per_second=decode_speed(model, tokenizer, config.eval.decode_tokens),
    )


def training_windows(config: DistillConfig, tokenizer: Any, teacher: torch.nn.Module, out: Path):
    text = load_text(config.data.source, "calibration")
    windows = token_windows(tokenizer, text, config.data.seq_len, config.data.max_windows)
    if config.data.sequence_kd is not None:
        generated = teacher_sequences(
            teacher, tokenizer, windows, config.data.sequence_kd, out / "teacher-generations.pt"
        )
        windows = torch.cat([windows, pack(generated, config.data.seq_len)])
    return windows


def distill(
    config: DistillConfig,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> DistillReport:
    out = output_dir(config)
    report_path = out / REPORT
    if report_path.is_file():
        done = DistillReport.model_validate_json(report_path.read_text())
        if done.finished:
            log.info("student already distilled in %s", out)
            return done
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    teacher_path = resolve_model(config.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = causal_lm_from_pretrained(teacher_path, dtype=torch.float32).eval()
    kept = kept_blocks(teacher, config.student, tokenizer, config.data.source)
    student = make_student(teacher, kept, config.student, tokenizer, config.data.source)
    log.info(
        "student keeps blocks %s of %d, FFN width %d of %d",
        kept,
        teacher.config.num_hidden_layers,
        student.config.intermediate_size,
        teacher.config.intermediate_size,
    )
    before = {
        "teacher": figures(teacher, tokenizer, config),
        "dropped": figures(student, tokenizer, config),
    }
    if config.train.steps == 0:
        return _write_untrained(
            config, out, teacher_path, kept, before, student, tokenizer, teacher
        )
    windows = training_windows(config, tokenizer, teacher, out)
    checkpoints = out / "checkpoints"
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    stop = StopOnInterrupt()
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.train.steps,
        per_device_train_batch_size=config.train.batch_size,
        learning_rate=config.train.learning_rate,
        warmup_steps=config.train.warmup_steps,
        weight_decay=config.train.weight_decay,
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=config.train.checkpoint_every,
        save_total_limit=2,
        logging_steps=max(1, min(10, config.train.steps // 10)),
        seed=config.train.seed,
        data_seed=config.train.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=not progress,
    )
    trainer = DistillationTrainer(
        model=student.train(),
        args=args,
        train_dataset=WindowDataset(windows),
        teacher=teacher,
        kept=kept,
        loss=config.loss,
        callbacks=[stop, *callbacks],
    )
    started = time.perf_counter()
    if resume:
        log.info("resuming from %s", resume)
    with interrupt_stops(stop):
        trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    finished = trainer.state.global_step >= config.train.steps and not stop.asked
    report = DistillReport(
        config=config,
        teacher_path=teacher_path,
        kept_blocks=kept,
        steps=trainer.state.global_step,
        finished=finished,
        resumed_from_step=None if resume is None else int(Path(resume).name.split("-")[-1]),
        train_seconds=seconds,
        windows=int(windows.shape[0]),
        losses=[entry for entry in trainer.state.log_history if "loss" in entry],
        teacher=before["teacher"],
        layer_dropped=before["dropped"],
        student=None,
    )
    if finished:
        _save_student(trainer.model, tokenizer, teacher, out)
        report.student = figures(trainer.model, tokenizer, config)
        shutil.rmtree(checkpoints, ignore_errors=True)
        log.info(
            "student in %s: perplexity %.3f (teacher %.3f, layer-dropped %.3f)",
            out,
            report.student.perplexity,
            report.teacher.perplexity,
            report.layer_dropped.perplexity,
        )
    else:
        log.warning("stopped at step %d; run again to continue from it", report.steps)
    out.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report.model_dump_json(indent=2))
    return report


def _write_untrained(
    config: DistillConfig,
    out: Path,
    teacher_path: str,
    kept: list[int],
    before: dict[str, ModelFigures],
    student: torch.nn.Module,
    tokenizer: Any,
    teacher: Any,
) -> DistillReport:
    """`train.steps: 0`: the layer-dropped model as it is, servable as a baseline."""
    _save_student(student, tokenizer, teacher, out)
    report = DistillReport(
        config=config,
        teacher_path=teacher_path,
        kept_blocks=kept,
        steps=0,
        finished=True,
        resumed_from_step=None,
        train_seconds=0.0,
        windows=0,
        losses=[],
        teacher=before["teacher"],
        layer_dropped=before["dropped"],
        student=before["dropped"],
    )
    (out / REPORT).write_text(report.model_dump_json(indent=2))
    log.info("layer-dropped student, untrained, in %s", out)
    return report


def _save_student(model: torch.nn.Module, tokenizer: Any, teacher: Any, out: Path) -> None:
    """A normal HF checkpoint: weights and config, the teacher's tokenizer and chat template,
    its generation config."""
    model.generation_config = teacher.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
