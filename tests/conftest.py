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

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _default_dtype_left_as_found():
    """torch's default dtype is process-wide and transformers sets it while it loads a model
    with a dtype. A test that leaves it changed (a load still running in a thread it started,
    or two loads racing) fails here, by name, and the tests after it on the same worker start
    from the dtype they expect instead of failing in its place."""
    before = torch.get_default_dtype()
    yield
    after = torch.get_default_dtype()
    if after != before:
        torch.set_default_dtype(before)
        pytest.fail(f"torch's default dtype was left at {after} (it was {before})")
