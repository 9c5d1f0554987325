"""The base every compression spec derives from, and the calibration settings they share.

A spec class is the whole description of a method: its `method` name (a Literal field, the key
of the config's discriminated union), its fields, `apply` (how it changes a model), `runs_on`
(which serving engines can run the result) and `cpu_isa_needed`. This module and every spec
module import no torch: the gateway and the config read them; `apply` imports the heavy code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimserve.kernels.cpu_isa import Isa

if TYPE_CHECKING:
    from torch import nn

    from .report import MethodReport

Engine = Literal["torch", "vllm"]


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

    @classmethod
    def method_name(cls) -> str:
        """The `method` value that selects this spec (its Literal field)."""
        (name,) = get_args(cls.model_fields["method"].annotation)
        return name

    def check_model(self, model_config: Any) -> None:
        """Raise ValueError (naming the field) if this spec cannot apply to the architecture.

        Called at config load with the model's transformers config, when it can be read
        without loading weights. Field-only checks belong in pydantic validators instead.
        """

    def apply(self, model: nn.Module) -> MethodReport:
        """Compress `model` in place. Implementations import torch and their algorithm here,
        not at module level, so that the spec stays importable without torch."""
        raise NotImplementedError(f"{type(self).__name__} has no apply")

    def runs_on(self, engine: Engine) -> bool:
        """Whether `engine` can serve what this spec produces. The torch engine serves every
        compressed module (each has a reference path); vLLM only what it has kernels for."""
        return engine == "torch"

    def cpu_isa_needed(self, engine: Engine) -> Isa:
        """The lowest CPU ISA level at which `engine` serves this spec's output on CPU."""
        # vLLM's CPU engine core dies on the 4-bit export below AVX-512, and oneDNN's int8
        # GEMMs saturate without VNNI; the torch engine has an exact path on every CPU.
        return Isa.AVX512 if engine == "vllm" else Isa.NONE


class UniformStructuredSpec(SpecBase):
    """Structured specs change every layer alike; per-layer exceptions would break that."""

    @field_validator("skip")
    @classmethod
    def _no_skip(cls, skip: list[str]) -> list[str]:
        if skip:
            raise ValueError("structured pruning changes every layer alike; skip is not supported")
        return skip
