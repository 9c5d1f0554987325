"""The base every compression spec derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Module names (fnmatch patterns on the qualified name) left untouched.
    skip: list[str] = Field(default_factory=list)
