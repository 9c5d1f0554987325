"""OpenAI wire formats, as pydantic models: the requests as slimserve takes them, the responses.

Every request field OpenAI documents is either honoured or refused by name (`REFUSED`, and
`extra="forbid"` for fields nobody documents): a field dropped in silence would hand the caller
different output than it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from ..engine.types import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 128  # choices (prompts x best_of) one request may ask for


class FieldError(ValueError):
    """A check across fields that names the one the caller should change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Strict(BaseModel):
    # strict: "5" is not a number; forbid: an unknown field is answered 400, not dropped.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    # vLLM's extension: the usage so far in every chunk (guidellm asks for it).
    continuous_usage_stats: bool = False
    include_obfuscation: Literal[False] = False  # chunks are never padded


class GenerationRequest(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    # Fields OpenAI documents that slimserve refuses (400 naming the field), and why.
    REFUSED: ClassVar[dict[str, str]] = {}

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's
    # An end-user identifier: accepted as OpenAI does; it does not change the output.
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    # Extensions, as vLLM names them.
    ignore_eos: bool = False  # keep generating past EOS, for fixed-length benchmarks
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    repetition_penalty: float = Field(1.0, ge=0.01, le=2.0)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"bias {value} for token {key} is outside -100..100")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options may only be set when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def sampling(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
        )


# ---- chat requests -----------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None  # an assistant turn that refused: its text is the content
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or self.refusal or ""


class JsonSchemaFormat(Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the output always matches the schema: constrained decoding


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no parameters
    strict: bool | None = None  # arguments always match: constrained decoding


class FunctionTool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(GenerationRequest):
    REFUSED: ClassVar[dict[str, str]] = {
        "audio": "the variants are text-only models",
        "function_call": "deprecated by OpenAI: use tool_choice",
        "functions": "deprecated by OpenAI: use tools",
        "metadata": "completions are not stored, so there is nothing to tag",
        "moderation": "no moderation model is deployed",
        "prediction": "predicted outputs (speculative decoding from given text) are not served",
        "prompt_cache_key": "the prefix cache is automatic and keyed by the prompt itself",
        "prompt_cache_options": "the prefix cache is automatic and keyed by the prompt itself",
        "prompt_cache_retention": "the prefix cache is automatic and keyed by the prompt itself",
        "reasoning_effort": "the variants are not reasoning models",
        "verbosity": "the variants are not reasoning models",
        "web_search_options": "no web search tool is deployed",
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Accepted with the only values slimserve can honour.
    modalities: list[Literal["text"]] | None = None  # text-only models
    store: Literal[False] = False  # completions are not stored
    service_tier: Literal["auto", "default"] | None = None  # one tier
    safety_identifier: str | None = None  # like `user`: does not change the output

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.tool_choice is not None and not self.tools:
            raise FieldError("tool_choice", "tool_choice requires tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {tool.function.name for tool in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise FieldError(
                    "tool_choice", f"no tool named {self.tool_choice.function.name!r} in tools"
                )
        if self.tools and self.tool_choice in (None, "auto"):
            # Free choice between text and a call needs a parser for the model's own
            # tool-call format; these models have none.
            raise FieldError(
                "tool_choice",
                "tool_choice 'auto' (the default when tools are given) is not supported: "
                "send 'required', 'none' or a named function",
            )
        if self.calls_tools and not isinstance(self.response_format, TextFormat | None):
            raise FieldError(
                "response_format", "response_format cannot be combined with a required tool call"
            )
        return self

    @property
    def calls_tools(self) -> bool:
        """The answer is a tool call (constrained to the tools' schemas), not text."""
        return self.tool_choice not in (None, "none")

    def sampling(self) -> SamplingParams:
        params = super().sampling()
        params.max_tokens = self.max_completion_tokens or self.max_tokens
        if self.logprobs:
            params.logprobs = self.top_logprobs or 0
        return params


# ---- completion requests -----------------------------------------------------------------------

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequest):
    REFUSED: ClassVar[dict[str, str]] = {
        "suffix": "insertion after a suffix needs a fill-in-the-middle model",
    }

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Prompt) -> Prompt:
        if not prompt or any(isinstance(p, list | str) and len(p) == 0 for p in prompt):
            raise ValueError("a prompt may not be empty")
        return prompt

    @model_validator(mode="after")
    def _choices(self):
        best_of = self.best_of or self.n
        if best_of < self.n:
            raise FieldError("best_of", f"best_of ({best_of}) must be at least n ({self.n})")
        if self.stream and best_of > self.n:
            raise FieldError("best_of", "best_of greater than n cannot be streamed")
        if len(self.prompts()) * best_of > MAX_CHOICES:
            raise FieldError(
                "prompt", f"at most {MAX_CHOICES} choices (prompts x best_of) per request"
            )
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, each as text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [self.prompt]  # one prompt given as token ids
        return self.prompt

    def sampling(self) -> SamplingParams:
        params = super().sampling()
        params.max_tokens = self.max_tokens
        params.logprobs = self.logprobs
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        return params


# ---- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


FinishReason = Literal["stop", "length", "tool_calls"] | None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data["tool_calls"] is None:
            del data["tool_calls"]
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCall):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI leaves unset delta fields out rather than sending nulls.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slimserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
