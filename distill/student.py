"""The student's starting point: the teacher with some decoder blocks removed (DistilBERT takes
every other layer; or the blocks layer pruning scores most important), optionally with narrower
FFNs (the channels FFN pruning scores highest)."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from slimserve.compression.arch import decoder_layers
from slimserve.compression.calib_data import calibration_override
from slimserve.compression.calibration import load_text, token_windows
from slimserve.compression.layer_pruning import block_importance, remove_layers
from slimserve.compression.methods.prune_ffn import FFNPruneSpec
from slimserve.compression.structured import apply_ffn_pruning

from .config import StudentInit

log = logging.getLogger(__name__)


def kept_blocks(
    teacher: nn.Module, init: StudentInit, tokenizer=None, source: str = "pydoc"
) -> list[int]:
    """Indices of the teacher's blocks the student keeps, ascending."""
    count = len(decoder_layers(teacher))
    if isinstance(init.keep, list):
        kept = sorted(set(init.keep))
        if not kept or kept[0] < 0 or kept[-1] >= count:
            raise ValueError(f"student.keep must name blocks in 0..{count - 1}, got {init.keep}")
        return kept
    if init.keep == "every-other":
        return list(range(0, count, 2))
    layers = init.layers or count // 2
    if not 1 <= layers <= count:
        raise ValueError(f"student.layers must be in 1..{count}, got {layers}")
    if tokenizer is None:
        raise ValueError("keeping blocks by importance needs the tokenizer")
    ids = token_windows(tokenizer, load_text(source, "calibration"), 128, init.calibration_samples)
    scores = block_importance(teacher, ids, init.importance)
    kept = sorted(sorted(range(count), key=lambda i: scores[i], reverse=True)[:layers])
    log.info("blocks by %s importance %s: keeping %s", init.importance, scores, kept)
    return kept


def make_student(
    teacher: nn.Module,
    kept: list[int],
    init: StudentInit | None = None,
    tokenizer=None,
    source: str = "pydoc",
) -> nn.Module:
    """A copy of the teacher holding only the kept blocks (embeddings, norm and head shared in
    value, not in storage); narrower when `init.ffn_keep_fraction` says so, its FFN channels
    chosen while every block is still in place (the teacher's activations score them)."""
    student = copy.deepcopy(teacher)
    if init is not None and init.ffn_keep_fraction is not None:
        if tokenizer is None:
            raise ValueError("a narrower student needs the tokenizer (its channels are scored)")
        text = load_text(source, "calibration")
        calibration = token_windows(tokenizer, text, 128, init.calibration_samples)
        spec = FFNPruneSpec(method="prune-ffn", keep_fraction=init.ffn_keep_fraction)
        spec.check_model(student.config)
        with calibration_override(calibration):
            apply_ffn_pruning(student, spec)
    count = len(decoder_layers(teacher))
    remove_layers(student, [i for i in range(count) if i not in set(kept)])
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student


def parameter_count(model: nn.Module) -> int:
    """Parameters, a tied embedding / head counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parameter_bytes(model: nn.Module) -> int:
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in unique)


@torch.no_grad()
def same_tokenizer(teacher_tokenizer, student_tokenizer) -> str | None:
    """None when the two tokenize and template alike, else the reason they do not."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        return "the vocabularies differ"
    for name in ("bos_token", "eos_token", "pad_token"):
        if getattr(teacher_tokenizer, name) != getattr(student_tokenizer, name):
            return f"the {name} differs"
    if getattr(teacher_tokenizer, "chat_template", None) != getattr(
        student_tokenizer, "chat_template", None
    ):
        return "the chat templates differ"
    return None
