"""A blocking generation on a worker thread, its events handed to the event loop.

The engine's streams, the tenant gate and the registry are thread-based (the gRPC server
calls them from its thread pool), so each HTTP generation runs on a thread of its own pool
for its whole life: waiting for a tenant slot, submitting, reading tokens. The event loop
only awaits an asyncio queue, so a request that waits for a slot never holds up the loop
or another request's tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from loramux.core.errors import Internal, LoramuxError
from loramux.server.generation import GenerationCall
from loramux.server.requests import GenerationRequest, TokenEvent

log = logging.getLogger(__name__)

STARTED = "started"  # the request holds a tenant slot and is in the engine
END = "end"  # the worker is done; nothing follows


class GenerationJob:
    """Runs `call` on a worker; `next()` gives STARTED, (choice index, TokenEvent) pairs,
    then END (or raises).

    A call of several engine requests (prompts x n) reads them one after the other: the
    engine runs them together meanwhile, so a later choice's events come in few pieces.
    """

    def __init__(
        self,
        call: GenerationCall,
        build: Callable[[], list[GenerationRequest]],
        renamed: dict[str, str],
    ) -> None:
        self.call = call
        self._build = build
        self._renamed = renamed  # engine field name -> this API's name for it
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def start(self, executor: Executor) -> None:
        executor.submit(self._work)

    async def next(self) -> tuple[int, TokenEvent] | str:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopping): nobody reads
            self.call.cancel()

    def _work(self) -> None:
        call, state = self.call, self.call.state
        try:
            with state.tracked(), call.recorded():
                requests = self._build()
                with call.submitted_all(requests, None) as streams:
                    self._put(STARTED)
                    for index, stream in enumerate(streams):
                        for event in call.events(stream, timed=index == 0):
                            self._put((index, event))
        except LoramuxError as error:
            self._put(self._rename(error))
        except Exception as exc:  # a bug: report it as INTERNAL, keep serving
            log.exception("unexpected error in an HTTP generation")
            self._put(Internal(None, f"internal error ({type(exc).__name__})"))
        finally:
            self._put(END)

    def _rename(self, error: LoramuxError) -> LoramuxError:
        """The error with its field named as this API names it (max_new_tokens -> max_tokens)."""
        if error.field is None or error.field.split("[")[0] not in self._renamed:
            return error
        head, bracket, rest = error.field.partition("[")
        return type(error)(self._renamed[head] + bracket + rest, error.message)
