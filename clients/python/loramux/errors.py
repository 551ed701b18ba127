"""The error vocabulary shared by engine, service and client.

The engine raises these without knowing about gRPC; the gRPC layer maps each
``code`` onto a status (the HTTP front onto an HTTP status), and the client maps statuses
back onto the same classes, so a caller catches ``loramux.errors.NotFound`` on either side
of the wire. It ships with the client package (`loramux-client`), which needs nothing but
grpcio and protobuf; the server imports it as ``loramux.core.errors``.
"""

from __future__ import annotations


class LoramuxError(Exception):
    """Base class. `code` is the gRPC status name the service answers with."""

    code = "INTERNAL"

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgument(LoramuxError):
    code = "INVALID_ARGUMENT"


class NotFound(LoramuxError):
    code = "NOT_FOUND"


class AlreadyExists(LoramuxError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(LoramuxError):
    """The input is well-formed but cannot work here (e.g. adapter shapes vs. the base)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(LoramuxError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(LoramuxError):
    code = "UNAVAILABLE"


class Unauthenticated(LoramuxError):
    code = "UNAUTHENTICATED"


class PermissionDenied(LoramuxError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(LoramuxError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(LoramuxError):
    code = "CANCELLED"


class Internal(LoramuxError):
    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[LoramuxError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}
