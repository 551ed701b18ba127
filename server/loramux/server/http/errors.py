"""LoRAMux's typed errors as OpenAI-style JSON bodies with the matching HTTP status.

The one place where `loramux.core.errors` meets HTTP: every handler raises the shared
error classes and this table turns them into ``{"error": {"message", "type", "param",
"code"}}``. The statuses follow gRPC's own HTTP mapping (google.rpc.Code), which is also
what the openai client's exception classes are keyed on (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...).
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loramux.core.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoramuxError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    retry_seconds,
)

# error class -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[type[LoramuxError], tuple[int, str]] = {
    InvalidArgument: (400, "invalid_request_error"),
    FailedPrecondition: (400, "invalid_request_error"),
    Unauthenticated: (401, "authentication_error"),
    PermissionDenied: (403, "permission_error"),
    NotFound: (404, "not_found_error"),
    AlreadyExists: (409, "conflict_error"),
    ResourceExhausted: (429, "rate_limit_error"),
    RateLimited: (429, "rate_limit_error"),
    Cancelled: (499, "cancelled_error"),  # the client closed the request (nginx's 499)
    Internal: (500, "server_error"),
    Unavailable: (503, "service_unavailable_error"),
    DeadlineExceeded: (504, "timeout_error"),
}
# Codes OpenAI's own API uses where one exists; otherwise the status name, lower case.
SPECIAL_CODES = {
    ("UNAUTHENTICATED", "authorization"): "invalid_api_key",
    ("NOT_FOUND", "model"): "model_not_found",
}


def error_body(error: LoramuxError) -> dict[str, Any]:
    code = SPECIAL_CODES.get((error.code, error.field or ""), error.code.lower())
    _, kind = HTTP_STATUS.get(type(error), HTTP_STATUS[Internal])
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": code}}


def error_status(error: LoramuxError) -> int:
    return HTTP_STATUS.get(type(error), HTTP_STATUS[Internal])[0]


def error_response(error: LoramuxError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, Unauthenticated) else None
    if isinstance(error, RateLimited):
        headers = {"Retry-After": str(retry_seconds(error))}
    return JSONResponse(error_body(error), status_code=error_status(error), headers=headers)


def from_validation(exc: RequestValidationError) -> InvalidArgument:
    """pydantic's first complaint about the body, with the field's dotted path as param."""
    errors = exc.errors()
    if not errors:
        return InvalidArgument(None, "invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    path = ""
    for part in loc:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    if first.get("type") == "json_invalid":
        return InvalidArgument(None, "the request body is not valid JSON")
    if first.get("type") == "extra_forbidden":
        return InvalidArgument(path or None, "is not a recognised request field")
    return InvalidArgument(path or None, str(first.get("msg", "invalid value")))


def from_http_exception(exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown route, wrong method) in the same JSON shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    body = {
        "error": {
            "message": str(exc.detail),
            "type": kind,
            "param": None,
            "code": str(exc.status_code),
        }
    }
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
