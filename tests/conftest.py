"""Shared test setup.

Triton kernels run on CPU tensors only under its interpreter, and the variable must be set
before triton is first imported anywhere in the test process.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
