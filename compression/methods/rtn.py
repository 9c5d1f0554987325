"""`rtn`: round-to-nearest group-wise int4 / int3 (asymmetric, weight-only), the no-data
baseline. The whole method is this module: a spec and its `apply`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .groupwise import GroupWiseSpec

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class RTNSpec(GroupWiseSpec):
    """Round each group of `group_size` weights to the nearest point of its min-max grid."""

    method: Literal["rtn"]

    def apply(self, model: nn.Module) -> MethodReport:
        import time

        from tqdm.auto import tqdm

        from ..arch import set_submodule, target_linears
        from ..grid import quantize_groups
        from ..lowbit import lowbit_linear
        from ..report import MethodReport, resident_weight_bytes

        self.check_model(model.config)  # a clear error before any work, not a kernel's
        started = time.perf_counter()
        before = resident_weight_bytes(model)
        targets = target_linears(model, self.skip)
        desc = f"rtn w{self.bits}g{self.group_size}"
        for name, linear in tqdm(targets, desc=desc, unit="layer", disable=None):
            quant = quantize_groups(
                linear.weight, self.bits, self.group_size, integer_zero=self.zero_point == "integer"
            )
            set_submodule(model, name, lowbit_linear(quant, linear.bias, linear.weight.dtype))
        return MethodReport(
            method=self.method,
            spec=self.model_dump(),
            modules_replaced=len(targets),
            seconds=time.perf_counter() - started,
            bytes_before=before,
            bytes_after=resident_weight_bytes(model),
        )
