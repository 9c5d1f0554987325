"""The base every compression spec derives from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CalibrationSpec(BaseModel):
    """Text the data-aware methods run through the model: `samples` windows of `seq_len` tokens
    (never the evaluation split)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field("pydoc", description='"pydoc" (offline docs) or a path to .txt / .jsonl')
    samples: int = Field(32, ge=1, le=4096, description="windows of seq_len tokens")
    seq_len: int = Field(256, ge=8, le=8192, description="tokens per window")

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source == "pydoc":
            return source
        path = Path(source).expanduser()
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f'must be "pydoc" or a .txt / .jsonl file, got {source!r}')
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        return str(path)


class SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Module names (fnmatch patterns on the qualified name) left untouched.
    skip: list[str] = Field(default_factory=list)

    def check_model(self, model_config: Any) -> None:
        """Raise ValueError (naming the field) if this spec cannot apply to the architecture.

        Called at config load with the model's transformers config, when it can be read
        without loading weights. Field-only checks belong in pydantic validators instead.
        """
