"""The gateway's view of a variant: generate, stats and score, wherever the variant runs."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from ..engine.types import EngineEvent, GenerateRequest
from .failures import VariantDownError, from_backend_exception, is_lost_replica

log = logging.getLogger(__name__)


class VariantBackend(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncGenerator[EngineEvent, None]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict: ...


class InProcessBackend:
    """A VariantServer in this process (tests, tools)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[EngineEvent, None]:
        async for batch in self.server.generate(request.model_dump()):
            for item in batch:
                yield EngineEvent.model_validate(item)

    async def stats(self) -> dict[str, Any]:
        return await self.server.stats()

    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict:
        return await self.server.score(request.model_dump(), reference, limit)


class RayBackend:
    """A VariantServer deployment behind a Ray Serve DeploymentHandle. A failure of the handle
    (backpressure, a lost replica, an exception in the replica) ends the stream with an error
    event, so that the caller always gets a word, never a dropped stream."""

    def __init__(self, variant: str, handle: Any) -> None:
        self.variant = variant
        self.handle = handle
        self._stream = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[EngineEvent, None]:
        response = self._stream.generate.remote(request.model_dump())
        try:
            async for batch in response:  # a replica's message: a batch of events (pacing.py)
                for item in batch:
                    yield EngineEvent.model_validate(item)
        except Exception as error:
            log.warning(
                "variant %s stream failed: %s: %s", self.variant, type(error).__name__, error
            )
            yield EngineEvent(kind="error", error=from_backend_exception(self.variant, error))
        finally:
            response.cancel()  # frees the replica's batch slot when the caller went away

    async def stats(self) -> dict[str, Any]:
        try:
            return await self.handle.stats.remote()
        except Exception as error:
            if is_lost_replica(error):
                raise VariantDownError(f"its replica was lost ({type(error).__name__})") from error
            raise

    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict:
        return await self.handle.score.remote(request.model_dump(), reference, limit)
