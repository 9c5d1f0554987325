"""Wire formats between the gateway, the variant server and the engine."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_LOGPROBS = 20  # alternatives per position, as vLLM's default max_logprobs
# Temperatures below this are greedy (as vLLM's): dividing by them overflows float32 logits.
GREEDY_BELOW = 1e-5


class StructuredOutput(BaseModel):
    """A constraint on the generated text, compiled into a token mask per step."""

    # A JSON schema as text; None: any JSON object (OpenAI's `json_object`).
    json_schema: str | None = None


class SamplingParams(BaseModel):
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 means greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=0)  # None: up to the context window; 0: prompt only
    min_tokens: int = Field(0, ge=0)  # EOS and stop_token_ids are masked until this many
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Bounded below: the penalty divides logits, and a tiny one overflows them.
    repetition_penalty: float = Field(1.0, ge=0.01, le=2.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    # Log-probabilities of each generated / prompt token, with this many alternatives (0: the
    # token's own only); None: not computed.
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )


class ErrorInfo(BaseModel):
    """An OpenAI-style error, with the HTTP status the gateway answers with."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class TopLogprob(BaseModel):
    token_id: int
    logprob: float
    token: str = ""  # the token's text: the replica fills it in (it has the tokenizer)


class TokenLogprob(TopLogprob):
    """One position: the token there, its log-probability, and the most likely alternatives."""

    top: list[TopLogprob] = Field(default_factory=list)


class EngineEvent(BaseModel):
    # "forwarded" ends a stream at the variant replica whose events the engine sent to the
    # gateway itself (event_channel.py); it never reaches the gateway. "refused": a replica's
    # door had no room for a request (replica/early_start.py); it never reaches a client.
    kind: Literal["accepted", "prompt", "delta", "done", "error", "forwarded", "refused"]
    text: str = ""  # on delta: the new text; on prompt: the prompt's text
    tokens: int = 0  # generated tokens this event stands for
    logprobs: list[TokenLogprob] | None = None  # on delta, when asked: one per token
    # On prompt, when asked: one per prompt token, the first None (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # On prompt: each prompt token's text (the replica fills it in; echo with logprobs needs it).
    token_texts: list[str] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length", "abort"] | None = None
    queue_seconds: float | None = None  # on "done": arrival to the start of its prefill
    error: ErrorInfo | None = None


def merge_deltas(first: EngineEvent, second: EngineEvent) -> EngineEvent:
    """One delta standing for two consecutive ones of a stream."""
    logprobs = None
    if first.logprobs is not None and second.logprobs is not None:
        logprobs = first.logprobs + second.logprobs
    return EngineEvent(
        kind="delta",
        text=first.text + second.text,
        tokens=first.tokens + second.tokens,
        logprobs=logprobs,
    )


class ReplyTo(BaseModel):
    """Where the engine may send a request's events itself: a gateway replica's inbox
    (event_channel.py)."""

    address: str  # an abstract Unix socket name ("\0..."), reachable on its node only
    authkey: str  # hex; the inbox answers only connections that prove they know it
    node_id: str  # the Ray node of the inbox; another node's engine relays instead
    stream: int  # this request's number in that inbox


class ReplicaDoor(BaseModel):
    """Where a gateway replica on the same node may send a request to a variant replica
    without a Ray Serve call (replica/early_start.py)."""

    address: str  # an abstract Unix socket name ("\0..."), reachable on its node only
    authkey: str  # hex
    node_id: str


class GenerateRequest(BaseModel):
    """What the gateway sends a variant: a prompt as text or token ids, or chat messages."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None  # function tools, for the chat template
    # Send a "prompt" event (the prompt's text, and its log-probabilities when asked) first.
    echo: bool = False
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    # Where the events may go straight (a gateway replica's inbox): the variant replica decides
    # whether its engine process sends them there, it does, or Serve's stream carries them.
    reply_to: ReplyTo | None = None

    @property
    def labels_tokens(self) -> bool:
        """Whether the variant replica must fill in token texts (it has the tokenizer): such
        events come from it, never straight from an engine process."""
        return (
            self.echo
            or self.sampling.logprobs is not None
            or (self.sampling.prompt_logprobs is not None)
        )
