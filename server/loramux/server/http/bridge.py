"""An HTTP generation run on the event loop, its errors named as this API names fields.

The engine's streams and the tenant gate are read through `loramux.server.aio`: the
admission work (adapter lookup, tokenising, grammar compile) runs on one of
`--http-workers` for its own length; waiting for a tenant slot, for tokens and for a slow
reader holds no thread. Measured: the server had as many threads with 200 open streams of
one tenant as with 50 (it had one more per stream before), +39-49 KiB of memory per stream,
while another tenant was served (`tests/test_http_streams.py`; docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor

from loramux.core.errors import Internal, LoramuxError
from loramux.server.aio import LoopGeneration
from loramux.server.generation import GenerationCall
from loramux.server.requests import GenerationRequest, TokenEvent

log = logging.getLogger(__name__)


class GenerationJob:
    """`start()`, then `next()` for (choice index, TokenEvent) pairs until None; `close()`
    on every way out. Errors are raised as LoramuxErrors with this API's field names;
    anything else is logged and raised as INTERNAL."""

    def __init__(
        self,
        call: GenerationCall,
        build: Callable[[], list[GenerationRequest]],
        renamed: dict[str, str],
        executor: Executor,
    ) -> None:
        self.call = call
        self._run = LoopGeneration(call, build, executor)
        self._renamed = renamed  # engine field name -> this API's name for it

    async def start(self) -> None:
        try:
            await self._run.start()
        except Exception as exc:
            raise self._failed(exc) from None

    async def next(self) -> tuple[int, TokenEvent] | None:
        try:
            item = await self._run.next()
        except Exception as exc:
            raise self._failed(exc) from None
        if item is None:
            self._run.close()
        return item

    def close(self, error: BaseException | None = None) -> None:
        """Idempotent; the first call decides the call's recorded status."""
        self._run.close(error)

    def _failed(self, exc: Exception) -> LoramuxError:
        """Close with `exc`; the error to report, its field renamed."""
        self._run.close(exc)
        if not isinstance(exc, LoramuxError):  # a bug: report it as INTERNAL, keep serving
            log.error("unexpected error in an HTTP generation", exc_info=exc)
            return Internal(None, f"internal error ({type(exc).__name__})")
        return self._rename(exc)

    def _rename(self, error: LoramuxError) -> LoramuxError:
        """The error with its field named as this API names it (max_new_tokens -> max_tokens)."""
        if error.field is None or error.field.split("[")[0] not in self._renamed:
            return error
        head, bracket, rest = error.field.partition("[")
        return type(error)(self._renamed[head] + bracket + rest, error.message)
