"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
status OpenAI uses, and the one table that turns our domain errors (services/common/errors.py,
also what the service clients raise) into them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TlmError,
    Unauthenticated,
    Unavailable,
)

# Our status -> (HTTP status, OpenAI error type). First match wins; anything else is a 500.
HTTP_TABLE: tuple[tuple[type[TlmError], int, str], ...] = (
    (InvalidArgument, 400, "invalid_request_error"),
    (NotFound, 404, "invalid_request_error"),
    (AlreadyExists, 409, "invalid_request_error"),
    (Aborted, 409, "invalid_request_error"),
    (FailedPrecondition, 400, "invalid_request_error"),
    (Unauthenticated, 401, "authentication_error"),
    (PermissionDenied, 403, "permission_error"),
    (ResourceExhausted, 503, "server_error"),  # the rollout queue is full: retry with backoff
    (Unavailable, 503, "server_error"),
    (DeadlineExceeded, 504, "server_error"),
)
# Fields of the rollout GenerateRequest -> the OpenAI parameter a client sent.
PARAMS: Mapping[str, str] = {
    "sampling.n": "n",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.max_tokens": "max_tokens",
    "sampling.stop": "stop",
    "sampling.seed": "seed",
}


@dataclass
class ApiError(Exception):
    """An error to answer with: HTTP status, message, and the parameter at fault."""

    status: int
    message: str
    param: str | None = None
    type: str = "invalid_request_error"
    code: str | None = None

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": error | {"code": self.code}}


def bad_param(param: str, description: str) -> ApiError:
    """400 naming the parameter, e.g. `temperature: must be in [0, 2]`."""
    return ApiError(400, f"{param}: {description}", param=param, code="invalid_value")


def param_for(field: str, prompt_param: str) -> str:
    """The OpenAI parameter for a rollout field: `prompts[2]` -> the prompt parameter.

    >>> param_for("sampling.temperature", "prompt"), param_for("prompts[1]", "messages")
    ('temperature', 'messages')
    """
    if field.startswith("prompts"):
        return prompt_param
    return PARAMS.get(field, field)


def from_domain(exc: TlmError, prompt_param: str = "prompt") -> ApiError:
    """The OpenAI-shaped error for one of ours, keeping its message."""
    found = next(((s, k) for cls, s, k in HTTP_TABLE if isinstance(exc, cls)), None)
    if found is None:
        return ApiError(500, "internal error in a backend service", type="server_error")
    status, kind = found
    param = param_for(exc.violations[0].field, prompt_param) if exc.violations else None
    if param is not None and status == 400:
        description = exc.violations[0].description
        return ApiError(status, f"{param}: {description}", param=param, code="invalid_value")
    return ApiError(status, exc.message, param=param, type=kind)
