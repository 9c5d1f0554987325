"""Wire formats between the gateway, the variant server and the engine."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class SamplingParams(BaseModel):
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 means greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context window
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False


class ErrorInfo(BaseModel):
    """An OpenAI-style error, with the HTTP status the gateway answers with."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class EngineEvent(BaseModel):
    kind: Literal["accepted", "delta", "done", "error"]
    text: str = ""
    tokens: int = 0  # generated tokens this event stands for
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length", "abort"] | None = None
    queue_seconds: float | None = None  # on "done": arrival to the start of its prefill
    error: ErrorInfo | None = None


class GenerateRequest(BaseModel):
    """What the gateway sends a variant: either a raw prompt or chat messages."""

    request_id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
