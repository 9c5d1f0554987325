"""POST /v1/completions: prompts in (text or token ids); continuations, or their chunks, out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.types import EngineEvent, GenerateRequest, TokenLogprob
from .body import read_body
from .choices import Choice, fan_out, usage
from .generation import generate
from .protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)

if TYPE_CHECKING:
    from .gateway import GatewayCore


class LogprobsWriter:
    """OpenAI's completion logprobs for one choice's tokens, in pieces (a stream sends them
    chunk by chunk); text_offset counts from the start of the choice's text."""

    def __init__(self) -> None:
        self.offset = 0

    def write(self, texts: list[str], entries: list[TokenLogprob | None]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for text, entry in zip(texts, entries, strict=True):
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:  # a prompt's first token: nothing predicts it
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(entry.logprob)
            # As vLLM: the alternatives and the token itself (lm-eval reads both).
            top = {alt.token: alt.logprob for alt in entry.top}
            top.setdefault(entry.token, entry.logprob)
            out.top_logprobs.append(top)
        return out

    def prompt(self, event: EngineEvent) -> CompletionLogprobs:
        texts = event.token_texts or []
        return self.write(texts, event.prompt_logprobs or [None] * len(texts))

    def tokens(self, entries: list[TokenLogprob]) -> CompletionLogprobs:
        return self.write([e.token for e in entries], list(entries))


def _joined(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for part in parts:
        out.tokens += part.tokens
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
        out.text_offset += part.text_offset
    return out


def _best(choices: list[Choice], n: int) -> list[Choice]:
    """best_of: per prompt, the n choices the variant found most likely, most likely first."""
    by_prompt: dict[int, list[Choice]] = {}
    for choice in choices:
        by_prompt.setdefault(choice.prompt_index, []).append(choice)
    return [
        best
        for group in by_prompt.values()
        for best in sorted(group, key=lambda c: c.cumulative_logprob, reverse=True)[:n]
    ]


class CompletionChunks:
    """One streamed answer: the echoed prompt when asked, text chunks, an empty one with the
    finish reason, and the usage chunk when asked for. Each chunk is a `text_completion`
    object, as OpenAI streams them."""

    def __init__(self, model: str, request: CompletionRequest) -> None:
        self.id = new_id("cmpl")
        self.created = now()
        self.model = model
        self.with_logprobs = request.logprobs is not None
        self.writers: dict[int, LogprobsWriter] = {}

    def _chunk(
        self, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def opening(self, choices: list[Choice]) -> list[CompletionResponse]:
        return []

    def event(self, choice: Choice, event: EngineEvent) -> list[CompletionResponse]:
        writer = self.writers.setdefault(choice.index, LogprobsWriter())
        logprobs = None
        if event.kind == "prompt":
            logprobs = writer.prompt(event) if self.with_logprobs else None
        elif not event.text and not event.logprobs:
            return []
        elif self.with_logprobs:
            logprobs = writer.tokens(event.logprobs or [])
        part = CompletionChoice(
            index=choice.index, text=event.text, finish_reason=None, logprobs=logprobs
        )
        return [self._chunk([part])]

    def finish(self, choice: Choice) -> list[CompletionResponse]:
        end = CompletionChoice(index=choice.index, text="", finish_reason=choice.finish_reason)
        return [self._chunk([end])]

    def usage(self, usage: Usage) -> CompletionResponse:
        return self._chunk([], usage)


class CompletionEndpoint:
    label = "completion"
    request_model = CompletionRequest

    def choices(self, request: CompletionRequest) -> list[Choice]:
        sampling = request.sampling()
        best_of = request.best_of or request.n
        if best_of > request.n and sampling.logprobs is None:
            sampling.logprobs = 0  # to rank the choices; not sent back
        bases = [
            GenerateRequest(
                request_id="",
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=None if isinstance(prompt, str) else prompt,
                echo=request.echo,
                sampling=sampling,
            )
            for prompt in request.prompts()
        ]
        return fan_out(bases, best_of)

    def response(
        self, model: str, request: CompletionRequest, choices: list[Choice]
    ) -> CompletionResponse:
        answers = []
        for rank, choice in enumerate(_best(choices, request.n)):
            text = choice.text
            logprobs = None
            if request.logprobs is not None:
                writer = LogprobsWriter()
                parts = [writer.prompt(choice.prompt)] if choice.prompt is not None else []
                logprobs = _joined([*parts, writer.tokens(choice.logprobs)])
            if choice.prompt is not None:
                text = choice.prompt.text + text
            answers.append(
                CompletionChoice(
                    index=choice.prompt_index * request.n + rank % request.n,
                    text=text,
                    finish_reason=choice.finish_reason,
                    logprobs=logprobs,
                )
            )
        return CompletionResponse(
            id=new_id("cmpl"), created=now(), model=model, usage=usage(choices), choices=answers
        )

    def chunks(self, model: str, request: CompletionRequest) -> CompletionChunks:
        return CompletionChunks(model, request)


def completions_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()
    endpoint = CompletionEndpoint()

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, core.config.server.max_request_bytes)
        return await generate(core, endpoint, body, request.headers)

    return router
