"""The shared error vocabulary, under the server's import path.

The classes live in the client package (`loramux.errors`, installed with `loramux-client`),
so a client-only install maps gRPC statuses onto the very classes the server raises; the
engine, registry and services import them from here.
"""

import math

from loramux.errors import (
    ERRORS_BY_CODE,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoramuxError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)


class RateLimited(ResourceExhausted):
    """RESOURCE_EXHAUSTED for a tenant over its rate budget, with the seconds until its
    window turns: the transports send them as `Retry-After` (HTTP) and as the `retry-after`
    trailing metadata (gRPC), so a client waits as long as needed and no longer."""

    def __init__(self, field: str | None, message: str, retry_after: float) -> None:
        super().__init__(field, message)
        self.retry_after = retry_after


def retry_seconds(error: RateLimited) -> int:
    """Whole seconds to wait, at least 1 (HTTP's Retry-After takes whole seconds)."""
    return max(1, math.ceil(error.retry_after))


__all__ = [
    "ERRORS_BY_CODE",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LoramuxError",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "retry_seconds",
]
