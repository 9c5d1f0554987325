"""Sequence-level KD data (Kim and Rush): what the teacher itself writes, generated once and kept
on disk beside the student: greedy continuations of training-text windows, or chat turns it
answers greedily (the user turns written by the teacher, built from text passages, or the user's
own)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .config import SequenceKD

log = logging.getLogger(__name__)

# Instructions wrapped around training-text passages (`user_turns: text`), taken in turn.
PASSAGE_INSTRUCTIONS = (
    "Explain in simple words what this text says:\n\n{passage}",
    "Summarize the following text in two sentences.\n\n{passage}",
    "What is the main idea of this text?\n\n{passage}",
    "Write one question a reader might ask about this text, then answer it.\n\n{passage}",
)
_PLACEHOLDER = "\x00turn\x00"


@torch.inference_mode()
def teacher_sequences(
    teacher: nn.Module,
    tokenizer: Any,
    windows: torch.Tensor,
    options: SequenceKD,
    cache: Path,
) -> list[torch.Tensor]:
    """Token ids of each prompt followed by what the teacher wrote, one 1-D tensor each."""
    settings = options.model_dump(mode="json")
    if cache.is_file():
        stored = torch.load(cache)
        if stored["options"] == settings:
            log.info("teacher generations from %s", cache)
            return stored["sequences"]
    torch.manual_seed(options.seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if options.style == "continuation":
        prompts = [row[: options.prompt_tokens].tolist() for row in windows[: options.prompts]]
        # Equal lengths: the EOS is suppressed, every continuation is new_tokens long.
        answers = _generate(
            teacher,
            prompts,
            options.new_tokens,
            options.batch_size,
            pad,
            eos,
            desc="teacher continuations",
            exact=True,
        )
    else:
        turns = _user_turns(teacher, tokenizer, windows, options, pad, eos)
        prompts = [_chat_prompt(tokenizer, turn) for turn in turns]
        answers = _generate(
            teacher,
            prompts,
            options.new_tokens,
            options.batch_size,
            pad,
            eos,
            desc="teacher answers",
            exact=False,
        )
    sequences = [torch.tensor(p + a) for p, a in zip(prompts, answers, strict=True)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"options": settings, "sequences": sequences}, cache)
    return sequences


def pack(sequences: list[torch.Tensor], length: int) -> torch.Tensor:
    """The sequences end to end, cut into [n, length] windows (the tail shorter than a window
    dropped), as pretraining packs documents."""
    stream = torch.cat(sequences)
    count = stream.numel() // length
    if count == 0:
        raise ValueError(
            f"the teacher's generations hold {stream.numel()} tokens, fewer than one "
            f"{length}-token window: raise sequence_kd.prompts or new_tokens"
        )
    return stream[: count * length].view(count, length)


def _chat_prompt(tokenizer: Any, turn: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": turn}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def _user_turns(
    teacher: nn.Module,
    tokenizer: Any,
    windows: torch.Tensor,
    options: SequenceKD,
    pad: int,
    eos: int,
) -> list[str]:
    source = options.user_turns or "teacher"
    if source == "text":
        passages = [
            tokenizer.decode(row[: options.prompt_tokens]).strip()
            for row in windows[: options.prompts]
        ]
        return [
            PASSAGE_INSTRUCTIONS[i % len(PASSAGE_INSTRUCTIONS)].format(passage=passage)
            for i, passage in enumerate(passages)
        ]
    if source == "teacher":
        # The template up to where a user's words begin; the teacher writes them, sampled.
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PLACEHOLDER}], tokenize=False
        )
        header = tokenizer(rendered[: rendered.index(_PLACEHOLDER)], add_special_tokens=False)
        written = _generate(
            teacher,
            [header.input_ids] * options.prompts,
            options.prompt_tokens,
            options.batch_size,
            pad,
            eos,
            desc="teacher-written user turns",
            exact=False,
            sample=True,
        )
        turns = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in written]
        kept = [turn for turn in turns if turn]
        log.info(
            "the teacher wrote %d user turns (%d empty ones dropped)",
            len(kept),
            len(turns) - len(kept),
        )
        return kept
    return _turns_from_file(Path(source))[: options.prompts]


def _turns_from_file(path: Path) -> list[str]:
    """A turn per line of a .txt, or each line's "prompt" field in a .jsonl."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        turns = lines
    else:
        turns = []
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{number}: each line needs a "prompt" string')
            turns.append(row["prompt"])
    if not turns:
        raise ValueError(f"{path} holds no user turns")
    return turns


def _generate(
    teacher: nn.Module,
    prompts: list[list[int]],
    new_tokens: int,
    batch_size: int,
    pad: int,
    eos: int,
    desc: str,
    exact: bool,
    sample: bool = False,
) -> list[list[int]]:
    """What the teacher writes after each prompt, in left-padded batches: exactly new_tokens
    tokens when `exact`, else up to and including its first EOS (at most new_tokens)."""
    answers: list[list[int]] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=None):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        sampling = {"do_sample": True, "temperature": 1.0, "top_p": 0.95} if sample else {}
        out = teacher.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if exact else None,
            pad_token_id=pad,
            eos_token_id=eos,
            **({"do_sample": False} | sampling),
        )
        for row in out[:, width:].tolist():
            answers.append(row if exact else _through_first(row, eos))
    return answers


def _through_first(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids
