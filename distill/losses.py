"""Distillation losses on next-token distributions, per token, averaged over the tokens a mask
keeps: forward KL on temperature-softened targets (Hinton et al.), reverse KL (MiniLLM), and the
generalized Jensen-Shannon divergence GKD interpolates with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import LossOptions


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float = 0.5,
) -> torch.Tensor:
    """Mean over masked tokens of D(teacher, student) at `temperature`, times T^2 (so its
    gradients keep their scale as T changes). logits [..., vocab], mask [...] bool."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward":  # KL(teacher || student): the student covers the teacher's mass
        per_token = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse":  # KL(student || teacher): the student seeks the teacher's modes
        per_token = (s.exp() * (s - t)).sum(-1)
    elif kind == "jsd":
        # beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta * t + (1 - beta) * s
        mixture = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        per_token = beta * (t.exp() * (t - mixture)).sum(-1) + (1 - beta) * (
            s.exp() * (s - mixture)
        ).sum(-1)
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    kept = mask.to(per_token.dtype)
    return (per_token * kept).sum() / kept.sum().clamp(min=1) * temperature**2


def aligned_hidden(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], kept: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pairs of hidden states (HF `output_hidden_states`: the embeddings, each block's output,
    the last one normed): student block j's output against the output of the teacher block it
    was copied from, kept[j], and the final normed states against each other."""
    pairs = [(student[j], teacher[kept[j - 1] + 1]) for j in range(1, len(student) - 1)]
    pairs.append((student[-1], teacher[-1]))
    return [s for s, _ in pairs], [t for _, t in pairs]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    options: LossOptions,
    student_hidden: list[torch.Tensor] | None = None,
    teacher_hidden: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum and its parts. logits [B, T, V] predict labels [B, T] shifted by one
    (labels -100 are ignored); hidden states are paired lists of [B, T, H]."""
    shifted_student = student_logits[:, :-1]
    shifted_teacher = teacher_logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    parts: dict[str, torch.Tensor] = {}
    if options.kd_weight > 0:
        parts["kd"] = divergence(
            shifted_student,
            shifted_teacher,
            mask,
            options.divergence,
            options.temperature,
            options.jsd_beta,
        )
    if options.lm_weight > 0:
        parts["lm"] = F.cross_entropy(
            shifted_student.float().reshape(-1, shifted_student.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
        )
    if options.hidden_weight > 0:
        if not student_hidden or teacher_hidden is None:
            raise ValueError("hidden_weight > 0 needs the hidden states of both models")
        parts["hidden"] = torch.stack(
            [
                F.mse_loss(s.float(), t.float())
                for s, t in zip(student_hidden, teacher_hidden, strict=True)
            ]
        ).mean()
    weights = {"kd": options.kd_weight, "lm": options.lm_weight, "hidden": options.hidden_weight}
    total = sum(weights[name] * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
