"""The admin API: live reweighting and canary control behind a bearer token.

`Authorization: Bearer <admin.token>` (or the token from the env var `admin.token_env`). No
header -> 401; a wrong token, or no token configured (admin disabled) -> 403; errors in OpenAI's
shape. The gateway runs one replica, so a change here is the whole gateway's; Ray Serve's
`reconfigure` (a new user_config on `serve deploy`) is the path that reaches every replica.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import AdminOptions, ShadowRule
from ..engine.types import ErrorInfo
from ..routing.router import RoutingError
from .errors import OpenAIError, validate_body

if TYPE_CHECKING:
    from .gateway import GatewayCore


class RoutingUpdate(BaseModel):
    """A partial routing section: what is given is applied, the rest stays."""

    model_config = ConfigDict(extra="forbid")

    split: dict[str, float] | None = None
    shadow: list[ShadowRule] | None = None

    @field_validator("shadow", mode="before")
    @classmethod
    def _one_rule_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value


class CanaryToggle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(description="whether the canary moves the split by itself")


def admin_token(options: AdminOptions) -> str | None:
    return options.token or os.environ.get(options.token_env) or None


def _forbidden(message: str, code: str) -> OpenAIError:
    return OpenAIError(ErrorInfo(status=403, message=message, type="permission_error", code=code))


def check_bearer(expected: str | None, header: str | None) -> None:
    if not header:
        raise OpenAIError.of(
            401, "missing admin token: send 'Authorization: Bearer <token>'", code="missing_token"
        )
    if expected is None:
        raise _forbidden(
            "the admin API is disabled: set admin.token or the SLIMSERVE_ADMIN_TOKEN env var",
            "admin_disabled",
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected):
        raise _forbidden("invalid admin token", "invalid_token")


def admin_router(core: GatewayCore, token: str | None) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def guard(request: Request) -> None:
        check_bearer(token, request.headers.get("authorization"))

    @router.get("/routing")
    async def get_routing(request: Request) -> dict:
        guard(request)
        return core.routing_state()

    @router.put("/routing")
    async def put_routing(request: Request) -> dict:
        guard(request)
        update = validate_body(await request.body(), RoutingUpdate)
        try:
            core.apply_routing(split=update.split, shadow=update.shadow)
        except RoutingError as error:
            raise OpenAIError.of(400, str(error), param=error.param, code="invalid_value") from None
        return core.routing_state()

    @router.put("/canary")
    async def put_canary(request: Request) -> dict:
        guard(request)
        toggle = validate_body(await request.body(), CanaryToggle)
        core.canary.set_auto(toggle.enabled)
        return core.routing_state()

    @router.post("/canary/evaluate")
    async def evaluate(request: Request) -> dict:
        """Judge every candidate now and, with automatic stepping on, act."""
        guard(request)
        decisions = core.canary.evaluate(await core.variant_stats(), force=True)
        return {
            "decisions": {name: d.model_dump() for name, d in decisions.items()},
            **core.routing_state(),
        }

    return router
