"""The one RPC wrapper: authentication, call tracking and status mapping for every handler.

Every servicer method is written as `handler(self, request, context, principal)` and
decorated with `@rpc` (or `@admin_rpc`). The decorator, the same for unary and streaming
handlers (a generator handler is detected and wrapped as a generator, so its errors are
caught while its responses are produced, as the grpc-interceptor package does):

1. counts the call in flight (draining waits for it; a draining server refuses it);
2. authenticates the caller from the `authorization` metadata (and checks admin rights);
3. counts it against the tenant's calls in flight, the same count as its HTTP calls
   (`ConcurrencyGate.call`: below the worker pool, so one tenant's flood never takes every
   thread, and all tenants together leave the health service its threads);
4. maps what the handler raises onto a gRPC status: a `LoramuxError` onto its code, with
   the offending field in the `loramux-error-field` trailing metadata; anything else onto
   CANCELLED when the client has gone away (not a bug), else INTERNAL, logged.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

from loramux.core.errors import Cancelled, Internal, LoramuxError, RateLimited, retry_seconds
from loramux.server.state import ServerState
from loramux.server.tenants import Authenticator, Front, Principal

log = logging.getLogger(__name__)

FIELD_METADATA = "loramux-error-field"
RETRY_AFTER_METADATA = "retry-after"
NO_DEADLINE_SECONDS = 10**7  # gRPC reports "no deadline" as a huge number of seconds

S = TypeVar("S", bound="Servicer")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[S, Req, grpc.ServicerContext, Principal], Resp]
Method = Callable[[S, Req, grpc.ServicerContext], Resp]


class Servicer:
    """Base of the gRPC servicers: they share the server's state."""

    def __init__(self, state: ServerState) -> None:
        self.state = state


def time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return max(float(remaining), 0.0)


def abort(context: grpc.ServicerContext, error: LoramuxError) -> None:
    """End the call with the error's status; never returns."""
    trailing = []
    if error.field:
        trailing.append((FIELD_METADATA, error.field))
    if isinstance(error, RateLimited):  # whole seconds, as HTTP's Retry-After
        trailing.append((RETRY_AFTER_METADATA, str(retry_seconds(error))))
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    context.abort(grpc.StatusCode[error.code], str(error))


@contextmanager
def guarded(
    state: ServerState, context: grpc.ServicerContext, method: str, *, admin: bool
) -> Iterator[Principal]:
    """Track, authenticate, and turn whatever escapes the body into the call's status."""
    try:
        with state.tracked():
            principal = state.auth.authenticate(dict(context.invocation_metadata()))
            if admin:
                Authenticator.require_admin(principal)
            with state.gate.call(principal.tenant, Front.GRPC):
                yield principal
    except LoramuxError as error:
        abort(context, error)
    except Exception as exc:
        if not context.is_active():  # the client went away (e.g. mid-upload): not a bug
            abort(context, Cancelled(None, "the client cancelled the call"))
        log.exception("unexpected error in %s", method)  # a bug: INTERNAL, keep serving
        abort(context, Internal(None, f"internal error ({type(exc).__name__})"))


def _wrapper(*, admin: bool) -> Callable[[Handler[S, Req, Resp]], Method[S, Req, Resp]]:
    def decorate(handler: Handler[S, Req, Resp]) -> Method[S, Req, Resp]:
        name = handler.__name__
        if inspect.isgeneratorfunction(handler):

            @functools.wraps(handler)
            def streaming(self: S, request: Req, context: grpc.ServicerContext) -> Any:
                with guarded(self.state, context, name, admin=admin) as principal:
                    yield from handler(self, request, context, principal)  # type: ignore[misc]

            return streaming

        @functools.wraps(handler)
        def unary(self: S, request: Req, context: grpc.ServicerContext) -> Resp:
            with guarded(self.state, context, name, admin=admin) as principal:
                return handler(self, request, context, principal)
            raise AssertionError("unreachable: guarded() aborts the call")

        return unary

    return decorate


rpc = _wrapper(admin=False)
"""Decorate a servicer method `(self, request, context, principal)` for any caller."""

admin_rpc = _wrapper(admin=True)
"""Like `rpc`, for admin callers only (others get PERMISSION_DENIED)."""
