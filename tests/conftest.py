"""Shared test setup.

Triton kernels run on CPU tensors only under its interpreter, and the variable must be set
before triton is first imported anywhere in the test process.

Tests compute on one thread, as an engine does by default on 2 cores: slimserve's own CPU
kernels serve only then (`kernels/native.py`); a test that wants more threads sets them.
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)
