"""Who may call the public API, from where: the API key, CORS, and the warning for a gateway
bound beyond loopback with nothing guarding it."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from ..config import ServerOptions
from .errors import OpenAIError

log = logging.getLogger(__name__)


def api_key(options: ServerOptions) -> str | None:
    return options.api_key or os.environ.get(options.api_key_env) or None


def key_guard(expected: str | None):  # -> a FastAPI dependency
    """Checks `Authorization: Bearer <key>` in constant time when a key is configured."""

    async def guard(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            raise OpenAIError.of(
                401,
                "Incorrect API key provided: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    return guard


def add_cors(api: FastAPI, options: ServerOptions, exposed: list[str]) -> None:
    if options.cors_origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=options.cors_origins,
            allow_methods=["GET", "POST", "PUT"],
            allow_headers=["*"],
            expose_headers=exposed,
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(options: ServerOptions) -> None:
    """Binding beyond loopback is the user's call; doing it with no key deserves a word."""
    if not is_loopback(options.host) and api_key(options) is None:
        log.warning(
            "serving on %s:%d with no API key: anyone who reaches this address can use the "
            "models; set server.api_key or the %s env var",
            options.host,
            options.port,
            options.api_key_env,
        )
