"""`prune-layers`: remove whole decoder blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..spec_base import CalibrationSpec, UniformStructuredSpec

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class LayerPruneSpec(UniformStructuredSpec):
    """Remove whole decoder blocks (Shortened LLaMA, Kim et al. 2024; Gromov et al. 2024).

    angular: blocks whose output is closest in angle to their input go first;
    perplexity: blocks whose removal alone raises calibration perplexity least go first.
    """

    method: Literal["prune-layers"]
    remove: int = Field(ge=1, description="number of decoder blocks to remove")
    importance: Literal["angular", "perplexity"] = "angular"
    keep_first: int = Field(1, ge=0, description="leading blocks never removed")
    keep_last: int = Field(1, ge=0, description="trailing blocks never removed")
    calibration: CalibrationSpec = Field(
        default_factory=lambda: CalibrationSpec(samples=16, seq_len=256)
    )

    def check_model(self, model_config: Any) -> None:
        layers = model_config.num_hidden_layers
        removable = layers - self.keep_first - self.keep_last
        if self.remove > removable:
            raise ValueError(
                f"remove={self.remove} is too large: the model has {layers} layers and "
                f"keep_first={self.keep_first}, keep_last={self.keep_last} protect "
                f"{layers - max(removable, 0)}"
            )

    def apply(self, model: nn.Module) -> MethodReport:
        from ..layer_pruning import apply_layer_pruning

        return apply_layer_pruning(model, self)
