"""The one RPC wrapper: authentication, call tracking and status mapping for every handler.

The gRPC server is `grpc.aio`'s: calls are tasks on one event loop (app.py, `GrpcServer`),
so a call that waits (for a tenant slot, for tokens, for a slow reader to take the last
message) holds no thread. Every servicer method is written as
`handler(self, request, context, principal)` and decorated with `@rpc` (or `@admin_rpc`).
The decorator takes four kinds of handler and serves each from the loop:

* `async def` (generation: waits on the engine's per-request buffer from the loop, aio.py);
* `async def` with `yield` (streamed generation): the same, one message per event;
* a plain function (blocking work: registry, files, tokenising): its body runs on the
  bounded pool of `--grpc-workers` threads, for its own length only (a client-streaming
  handler is `async def`: the upload awaits each chunk on the loop, writes it on the pool);
* a plain generator (download): each `next()` runs on that pool, each message is sent from
  the loop, so a slow reader holds no thread.

For every kind, the wrapper:

1. counts the call in flight (draining waits for it; a draining server refuses it);
2. authenticates the caller from the `authorization` metadata (on the pool: the registry
   may be a database) and checks admin rights;
3. counts it against the tenant's calls in flight, the same count as its HTTP calls
   (`ConcurrencyGate.hold`, `--tenant-max-calls`: refused at once with RESOURCE_EXHAUSTED
   naming the flag);
4. maps what the handler raises onto a gRPC status: a `LoramuxError` onto its code, with
   the offending field in the `loramux-error-field` trailing metadata (and `retry-after`
   for a rate); anything else onto INTERNAL, logged. A client that goes away cancels the
   call's task (CancelledError, not a bug, never logged).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc

from loramux.core.errors import Internal, LoramuxError, RateLimited, retry_seconds
from loramux.server.tenants import Authenticator, Front, Principal

if TYPE_CHECKING:
    from grpc.aio import ServicerContext

    from loramux.server.state import ServerState

log = logging.getLogger(__name__)

FIELD_METADATA = "loramux-error-field"
RETRY_AFTER_METADATA = "retry-after"
NO_DEADLINE_SECONDS = 10**7  # gRPC reports "no deadline" as a huge number of seconds

S = TypeVar("S", bound="Servicer")
Handler = Callable[..., Any]
Method = Callable[..., Any]
_DONE = object()


class Servicer:
    """Base of the gRPC servicers: they share the server's state and its blocking pool."""

    def __init__(self, state: ServerState, executor: Executor) -> None:
        self.state = state
        self.executor = executor


def time_left(context: ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return max(float(remaining), 0.0)


async def abort(context: ServicerContext, error: LoramuxError) -> NoReturn:
    """End the call with the error's status; never returns."""
    trailing = []
    if error.field:
        trailing.append((FIELD_METADATA, error.field))
    if isinstance(error, RateLimited):  # whole seconds, as HTTP's Retry-After
        trailing.append((RETRY_AFTER_METADATA, str(retry_seconds(error))))
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    await context.abort(grpc.StatusCode[error.code], str(error))
    raise AssertionError("unreachable: abort raises")


@asynccontextmanager
async def guarded(
    servicer: Servicer, context: ServicerContext, method: str, *, admin: bool
) -> AsyncIterator[Principal]:
    """Track, authenticate, count, and turn whatever escapes the body into the status."""
    state = servicer.state
    try:
        with state.tracked():
            metadata = dict(context.invocation_metadata() or ())
            loop = asyncio.get_running_loop()
            principal = await loop.run_in_executor(
                servicer.executor, state.auth.authenticate, metadata
            )
            if admin:
                Authenticator.require_admin(principal)
            with state.gate.call(principal.tenant, Front.GRPC):
                yield principal
    except LoramuxError as error:
        await abort(context, error)
    except Exception as exc:  # a bug: INTERNAL, keep serving
        log.exception("unexpected error in %s", method)
        await abort(context, Internal(None, f"internal error ({type(exc).__name__})"))


def _wrapper(*, admin: bool) -> Callable[[Handler], Method]:
    def decorate(handler: Handler) -> Method:
        name = handler.__name__

        if inspect.isasyncgenfunction(handler):

            @functools.wraps(handler)
            async def streaming(self: S, request: Any, context: ServicerContext) -> Any:
                async with guarded(self, context, name, admin=admin) as principal:
                    async for message in handler(self, request, context, principal):
                        yield message

            return streaming

        if inspect.iscoroutinefunction(handler):

            @functools.wraps(handler)
            async def unary(self: S, request: Any, context: ServicerContext) -> Any:
                async with guarded(self, context, name, admin=admin) as principal:
                    return await handler(self, request, context, principal)
                raise AssertionError("unreachable: guarded() aborts the call")

            return unary

        if inspect.isgeneratorfunction(handler):

            @functools.wraps(handler)
            async def blocking_stream(self: S, request: Any, context: ServicerContext) -> Any:
                async with guarded(self, context, name, admin=admin) as principal:
                    loop = asyncio.get_running_loop()
                    messages = handler(self, request, context, principal)
                    try:
                        while True:
                            message = await loop.run_in_executor(
                                self.executor, next, messages, _DONE
                            )
                            if message is _DONE:
                                break
                            yield message
                    finally:
                        # ValueError: still running on the pool (the call was cancelled
                        # meanwhile); it ends there, then is collected
                        with suppress(ValueError):
                            messages.close()

            return blocking_stream

        @functools.wraps(handler)
        async def blocking(self: S, request: Any, context: ServicerContext) -> Any:
            async with guarded(self, context, name, admin=admin) as principal:
                loop = asyncio.get_running_loop()
                body = functools.partial(handler, self, request, context, principal)
                return await loop.run_in_executor(self.executor, body)
            raise AssertionError("unreachable: guarded() aborts the call")

        return blocking

    return decorate


rpc = _wrapper(admin=False)
"""Decorate a servicer method `(self, request, context, principal)` for any caller."""

admin_rpc = _wrapper(admin=True)
"""Like `rpc`, for admin callers only (others get PERMISSION_DENIED)."""
