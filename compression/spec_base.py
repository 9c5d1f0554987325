"""The base every compression spec derives from."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Module names (fnmatch patterns on the qualified name) left untouched.
    skip: list[str] = Field(default_factory=list)

    def check_model(self, model_config: Any) -> None:
        """Raise ValueError (naming the field) if this spec cannot apply to the architecture.

        Called at config load with the model's transformers config, when it can be read
        without loading weights. Field-only checks belong in pydantic validators instead.
        """
