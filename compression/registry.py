"""Apply compression specs to a model, in the order given."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from .report import CompressionReport, resident_weight_bytes
from .specs import CompressionSpec

log = logging.getLogger(__name__)


def apply_compression(model: nn.Module, specs: Sequence[CompressionSpec]) -> CompressionReport:
    before = resident_weight_bytes(model)
    reports = []
    for spec in specs:
        report = spec.apply(model)
        log.info(
            "%s: replaced %d modules in %.2fs, %.1f MB -> %.1f MB",
            spec.method,
            report.modules_replaced,
            report.seconds,
            report.bytes_before / 1e6,
            report.bytes_after / 1e6,
        )
        reports.append(report)
    return CompressionReport(
        methods=reports, weight_bytes_before=before, weight_bytes_after=resident_weight_bytes(model)
    )
