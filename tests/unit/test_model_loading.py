"""Loads and builds of a causal LM in threads of one process leave torch's default dtype alone."""

from __future__ import annotations

import threading

import torch

from slimserve.models.loading import causal_lm_from_config

from .conftest import tiny_llama

THREADS = 6
BUILDS = 30


def test_builds_with_a_dtype_racing_in_threads_leave_the_default_dtype_as_it_was():
    config = tiny_llama(vocab_size=512, dtype=torch.float32).config
    built: list[torch.dtype] = []
    start = threading.Barrier(THREADS)

    def build() -> None:
        start.wait()
        for _ in range(BUILDS):
            built.append(
                next(causal_lm_from_config(config, dtype=torch.bfloat16).parameters()).dtype
            )

    threads = [threading.Thread(target=build) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == [torch.bfloat16] * THREADS * BUILDS
    assert torch.get_default_dtype() == torch.float32
