"""`each_isa`: a test that uses it runs once per ISA level of slimserve's native CPU kernels,
with that level forced through SLIMSERVE_CPU_ISA, so the AVX2 build is exercised on every
machine; a level this CPU cannot execute is skipped, naming the flags it lacks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from slimserve.kernels import cpu_isa
from slimserve.kernels.cpu_isa import Isa

from .helpers import cpu_has

NATIVE_LEVELS = [level for level in Isa if level > Isa.NONE]


@pytest.fixture(params=NATIVE_LEVELS, ids=lambda level: level.label)
def each_isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Isa]:
    level: Isa = request.param
    flags = cpu_isa.ISA_FLAGS[level]
    if not cpu_has(*flags):
        missing = [flag for flag in flags if not cpu_has(flag)]
        pytest.skip(f"this CPU cannot run the {level.label} kernels: no {', '.join(missing)}")
    monkeypatch.setenv(cpu_isa.ISA_ENV, level.label)
    cpu_isa.active.cache_clear()
    yield level
    cpu_isa.active.cache_clear()  # the next caller reads the restored environment
