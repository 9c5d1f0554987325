"""OpenAI-style errors: one exception type, one JSON shape."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ..engine.types import ErrorInfo
from .protocol import ErrorBody, ErrorResponse, FieldError

ModelT = TypeVar("ModelT", bound=BaseModel)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "server_overloaded",
}


class OpenAIError(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info

    @classmethod
    def of(
        cls, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> OpenAIError:
        kind = _TYPE_BY_STATUS.get(status, "server_error")
        return cls(ErrorInfo(status=status, message=message, type=kind, param=param, code=code))


def error_payload(info: ErrorInfo) -> dict:
    body = ErrorBody(message=info.message, type=info.type, param=info.param, code=info.code)
    return ErrorResponse(error=body).model_dump()


def error_response(info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(info), status_code=info.status, headers=headers)


def from_validation_error(error: ValidationError) -> OpenAIError:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        param = cause.param
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = f"'{param}' is a required property"
    elif first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return OpenAIError.of(400, message, param=param, code="invalid_value")


def _number(text: str) -> float | int:
    # JSON has one number type: 43.0 is the integer 43 to a JSON Schema, so it is to us too
    # (the request models are strict: they would refuse a float where an integer goes).
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def parse_json_body(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_float=_number)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OpenAIError.of(
            400, f"We could not parse the JSON body of your request: {error}", code="invalid_json"
        ) from None


def _without_nulls(body: object) -> object:
    """A null field means the field is absent (clients send both), at the top level and in
    chat messages; deeper down (JSON schemas) a null is the caller's value."""
    if not isinstance(body, dict):
        return body
    body = {key: value for key, value in body.items() if value is not None}
    if isinstance(body.get("messages"), list):
        body["messages"] = [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
            for m in body["messages"]
        ]
    return body


def validate_body(raw: bytes, model: type[ModelT]) -> ModelT:
    """A request body as `model`, or the OpenAIError the caller is answered with."""
    body = _without_nulls(parse_json_body(raw))
    if isinstance(body, dict):
        for field, reason in getattr(model, "REFUSED", {}).items():
            if field in body:
                raise OpenAIError.of(
                    400,
                    f"'{field}' is not supported: {reason}",
                    param=field,
                    code="unsupported_parameter",
                )
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise from_validation_error(error) from None
