"""Specs of the pruning and low-rank methods (one pydantic model each, keyed by `method`)."""

from __future__ import annotations

from slimserve.compression.spec_base import SpecBase

PRUNE_SPECS: tuple[type[SpecBase], ...] = ()
