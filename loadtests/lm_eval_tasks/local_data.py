"""This folder's task data, loaded from its JSONL files for lm-eval's `custom_dataset` hook.

lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset` unchanged, so a relative
path there resolves against the caller's working directory; these loaders resolve it against
this folder instead, and read the file in memory (no hub, no datasets cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def _test_split(filename: str) -> datasets.DatasetDict:
    lines = (HERE / filename).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def facts_mc(**_: Any) -> datasets.DatasetDict:
    # lm-eval passes the task's metadata (version, ...) as keyword arguments.
    return _test_split("facts_mc.jsonl")


def short_answers_gen(**_: Any) -> datasets.DatasetDict:
    return _test_split("short_answers_gen.jsonl")
