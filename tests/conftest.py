"""Shared test setup.

Triton kernels run on CPU tensors only under its interpreter, and the variable must be set
before triton is first imported anywhere in the test process.

pytest-xdist runs the tests on two workers (pyproject.toml). Every module that starts Ray (a
local cluster in the test process, or `slimserve serve`, which starts one) is in the xdist group
"ray", so those run on one worker one after another: two Ray clusters starting at once on two
cores would take each other's CPU for minutes.

Tests compute on one thread, as an engine does by default on 2 cores: slimserve's own CPU
kernels serve only then (`kernels/native.py`); a test that wants more threads sets them.
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)
