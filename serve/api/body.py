"""Request bodies, read up to a size limit: a larger one is refused with 413 before it is read
whole (by its Content-Length when it declares one, else as soon as it passes the limit)."""

from __future__ import annotations

from fastapi import Request

from .errors import OpenAIError


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError.of(
        413,
        f"the request body is larger than this server takes ({limit} bytes; "
        "server.max_request_bytes)",
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        parts.append(part)
    return b"".join(parts)
