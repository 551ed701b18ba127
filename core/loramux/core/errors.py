"""The shared error vocabulary, under the server's import path.

The classes live in the client package (`loramux.errors`, installed with `loramux-client`),
so a client-only install maps gRPC statuses onto the very classes the server raises; the
engine, registry and services import them from here.
"""

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
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
