"""Pruning and low-rank methods by name."""

from __future__ import annotations

PRUNE_METHODS: dict = {}
