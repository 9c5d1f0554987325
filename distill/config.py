"""What `slimserve distill` makes and how: the student's initialisation from the teacher, the
data, the losses and the training budget. Same pydantic style as a variant's config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudentInit(_Strict):
    """Which of the teacher's decoder blocks the student keeps (DistilBERT-style initialisation)."""

    keep: Literal["every-other", "importance"] | list[int] = Field(
        "every-other", description="every other block, the most important ones, or these indices"
    )
    layers: int | None = Field(
        None, ge=1, description="blocks kept by importance (default: half the teacher's)"
    )
    importance: Literal["angular", "perplexity"] = Field(
        "angular", description="the block score layer pruning uses"
    )
    calibration_samples: int = Field(
        8, ge=1, description="windows scoring the blocks (and the FFN channels)"
    )
    ffn_keep_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="a narrower student: each kept block keeps this share of its FFN channels, "
        "the ones FFN pruning scores highest on the teacher (rounded to a multiple of 64)",
    )


class SequenceKD(_Strict):
    """Kim and Rush's sequence-level KD: train on what the teacher itself writes.

    `continuation`: the teacher's greedy continuations of training-text windows. `chat`: chat
    turns rendered with the teacher's template, the teacher's greedy answer closing each; the user
    turns come from `user_turns`: written by the teacher itself (sampled after the template's user
    header: broad, self-instruct style, no outside data), instructions over training-text passages
    (`text`), or the user's own file (.txt a turn per line, .jsonl with a "prompt" field).
    """

    style: Literal["continuation", "chat"] = "continuation"
    user_turns: Literal["teacher", "text"] | Path | None = Field(
        None, description='chat only: where the user turns come from (default "teacher")'
    )
    prompts: int = Field(32, ge=1, description="sequences the teacher writes")
    prompt_tokens: int = Field(32, ge=1, description="tokens of each text prompt or passage")
    new_tokens: int = Field(64, ge=1, description="at most this many tokens per answer")
    batch_size: int = Field(16, ge=1, description="prompts the teacher answers at once")
    seed: int = Field(0, description="for the sampled user turns")

    @model_validator(mode="after")
    def _turns_need_chat(self) -> SequenceKD:
        if self.style == "continuation" and self.user_turns is not None:
            raise ValueError("user_turns applies to style: chat only")
        return self


class DataOptions(_Strict):
    source: str = Field("pydoc", description='"pydoc" (its training split) or a .txt/.jsonl path')
    seq_len: int = Field(128, ge=8, description="tokens per training window")
    max_windows: int | None = Field(None, ge=1, description="use at most this many windows")
    sequence_kd: SequenceKD | None = Field(None, description="add the teacher's generations")


class LossOptions(_Strict):
    """loss = kd_weight * T^2 * D(teacher || student at temperature T) + lm_weight * CE
    + hidden_weight * MSE(student hidden states, the teacher's at the kept blocks)."""

    divergence: Literal["forward", "reverse", "jsd"] = Field(
        "forward", description="forward KL (Hinton), reverse KL (MiniLLM), or generalized JSD"
    )
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="mixture weight of the generalized JSD")
    temperature: float = Field(2.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    lm_weight: float = Field(0.5, ge=0)
    hidden_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _some_loss(self) -> LossOptions:
        if self.kd_weight == self.lm_weight == self.hidden_weight == 0:
            raise ValueError("at least one of kd_weight, lm_weight, hidden_weight must be > 0")
        return self


class TrainOptions(_Strict):
    steps: int = Field(
        300, ge=0, description="0: write the layer-dropped student untrained (a baseline to serve)"
    )
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads (default: all cores)")


class EvalOptions(_Strict):
    tokens: int = Field(8192, ge=64, description="held-out tokens scored for perplexity")
    context: int = Field(256, ge=8)
    decode_tokens: int = Field(32, ge=1, description="tokens timed for the decode speed")


class DistillConfig(_Strict):
    teacher: str = Field(description="embedded alias, a local HF directory, or a hub id")
    student: StudentInit = Field(default_factory=StudentInit)
    data: DataOptions = Field(default_factory=DataOptions)
    loss: LossOptions = Field(default_factory=LossOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    output: Path | None = Field(None, description="default: the cache, by this config's digest")

    def digest(self) -> str:
        """Of everything that shapes the student (not where it is written)."""
        content = self.model_dump(mode="json", exclude={"output"})
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_distill_config(path: str | Path) -> DistillConfig:
    return DistillConfig.model_validate(yaml.safe_load(Path(path).read_text()))
