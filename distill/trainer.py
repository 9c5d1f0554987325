"""transformers' Trainer with a teacher: its loop, optimizer, schedule, checkpoints (with the RNG
and data position, so a resumed run continues the same one) and progress bar, and our loss."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from .config import LossOptions
from .losses import aligned_hidden, distillation_loss


class WindowDataset(Dataset):
    """Token windows [n, T] as causal-LM examples (every token is a target)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.windows[index]
        return {"input_ids": ids, "labels": ids.clone()}


class DistillationTrainer(Trainer):
    def __init__(
        self, *args: Any, teacher: nn.Module, kept: list[int], loss: LossOptions, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.kept = kept
        self.loss_options = loss
        self._parts: dict[str, list[float]] = {}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        hidden = self.loss_options.hidden_weight > 0
        outputs = model(input_ids=inputs["input_ids"], output_hidden_states=hidden)
        with torch.no_grad():
            taught = self.teacher(input_ids=inputs["input_ids"], output_hidden_states=hidden)
        student_hidden = teacher_hidden = None
        if hidden:
            student_hidden, teacher_hidden = aligned_hidden(
                outputs.hidden_states, taught.hidden_states, self.kept
            )
        total, parts = distillation_loss(
            outputs.logits,
            taught.logits,
            inputs["labels"],
            self.loss_options,
            student_hidden,
            teacher_hidden,
        )
        for name, value in parts.items():
            self._parts.setdefault(name, []).append(value)
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # The loss parts, averaged since the last log line, beside the total.
        if "loss" in logs:
            for name, values in self._parts.items():
                logs[f"loss_{name}"] = round(sum(values) / len(values), 5)
            self._parts = {}
        super().log(logs, *args, **kwargs)


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C asks for a stop: the current step ends, a checkpoint is written, training ends."""

    def __init__(self) -> None:
        self.asked = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.asked:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextmanager
def interrupt_stops(callback: StopOnInterrupt) -> Iterator[None]:
    """SIGINT sets the callback's flag instead of raising (the main thread only)."""
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(callback, "asked", True))
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
