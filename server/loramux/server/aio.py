"""A generation call served from an asyncio event loop: no thread while it waits.

The engine, its streams and the tenant gate are thread-based; both transports serve from an
event loop (the HTTP front on uvicorn's, gRPC on grpc.aio's: rpc/inference.py) and read
them through this module instead of parking a thread on each call.
Only the admission work, which computes rather than waits (adapter lookup, tokenising,
grammar compile), runs on a pool thread, for its own length. Then:

* a call that must wait for one of its tenant's slots waits in the gate's line as a
  callback (`ConcurrencyGate.enter`/`retry`), not as a thread on a condition;
* its tokens reach it through the engine's one buffer per request (`RequestStream`): the
  engine thread hands events over without ever blocking and calls the stream's `notify`
  only when the reader waits (it `arm`ed the stream) or the request finished; a reader
  that falls behind, e.g. a client that reads slowly so that the response cannot be sent,
  takes what piled up as one merged event when it next asks (streams.py). That list
  holds at most the request's own tokens (`max_tokens`);
* wake-ups from other threads go through one `Doorbell` per loop: however many streams
  become due in one engine step, the loop is woken once (one write to its self-pipe), and
  the callbacks run on the loop.

The tenant's slot is released as soon as the engine has handed over every final event,
not when the reader has taken them: a slow reader holds memory, not a slot, as before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import ExitStack, suppress

from loramux.core.errors import Cancelled, LoramuxError
from loramux.server.generation import GenerationCall
from loramux.server.requests import GenerationRequest, TokenEvent
from loramux.server.streams import RequestStream
from loramux.server.tenants import ConcurrencyGate, Principal

log = logging.getLogger(__name__)

_BELLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Doorbell] = weakref.WeakKeyDictionary()


class Doorbell:
    """Runs callbacks on one event loop, rung from any thread, waking the loop once per batch.

    `loop.call_soon_threadsafe` writes to the loop's self-pipe on every call; at batch 32
    every engine step would cost 32 writes (and as many reads). Rings that come while a
    delivery is already scheduled only join its queue.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._rung: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    @staticmethod
    def of_running_loop() -> Doorbell:
        """The running loop's doorbell (created at its first use)."""
        loop = asyncio.get_running_loop()
        bell = _BELLS.get(loop)
        if bell is None:
            bell = _BELLS[loop] = Doorbell(loop)
        return bell

    def ring(self, callback: Callable[[], None]) -> bool:
        """Any thread: run `callback` on the loop soon. False when the loop is closed (the
        callback will never run)."""
        self._rung.append(callback)
        with self._lock:
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody will read
            return False
        return True

    def _deliver(self) -> None:
        with self._lock:
            self._scheduled = False  # first: a ring from now on schedules another delivery
        rung = self._rung
        while rung:
            callback = rung.popleft()
            try:
                callback()
            except Exception:  # a bug in one callback must not strand the others' wake-ups
                log.exception("a wake-up callback failed")


class LoopStream:
    """One engine stream read on the loop: `next_event()` awaits without a thread.

    `on_final(self)` runs on the loop once, when the engine has handed over the request's
    final event, whether or not the reader has taken it (after `check_final()` for one
    handed over before this reader listened).
    """

    def __init__(
        self, stream: RequestStream, bell: Doorbell, on_final: Callable[[LoopStream], None]
    ) -> None:
        self.stream = stream
        self._bell = bell
        self._on_final = on_final
        self.final_seen = False
        self._due = asyncio.Event()
        stream.listen(self._notify)

    def _notify(self) -> None:
        """Engine thread: schedule the wake-up; nothing else (never blocks, never raises)."""
        if not self._bell.ring(self._woken):
            self.stream.cancel()  # the loop is gone: nobody will read this request

    def _woken(self) -> None:
        self._due.set()
        self.check_final()

    def check_final(self) -> None:
        if self.stream.final is not None and not self.final_seen:
            self.final_seen = True
            self._on_final(self)

    async def next_event(self) -> TokenEvent:
        """Everything due as one event, waiting on the loop until something is."""
        while True:
            self._due.clear()
            self.stream.arm()
            event = self.stream.poll()
            if event is not None:
                return event
            await self._due.wait()


async def tenant_slot(
    gate: ConcurrencyGate, principal: Principal, gone: Callable[[], bool], bell: Doorbell
) -> None:
    """Take one of the tenant's running slots, waiting in its line without a thread (the
    line is bounded by the tenant's quota; a caller that goes away leaves it: Cancelled).
    Release with `gate.leave(principal.tenant)`."""
    woken = asyncio.Event()

    def waker() -> None:  # any thread: a slot may have freed, or a waiter gone
        bell.ring(woken.set)

    if gate.enter(principal, waker):
        return
    while True:
        woken.clear()
        if gate.retry(principal, waker, gone()):
            return
        try:
            await woken.wait()
        except BaseException:  # the task was cancelled while in line: leave the line
            with suppress(Cancelled):
                gate.retry(principal, waker, gone=True)
            raise


class LoopGeneration:
    """A `GenerationCall` on the event loop: `start()`, `next()` until None, `close()`.

    Holds, from `start` to `close`, what the thread-based path holds in `with` blocks: the
    drain count (`state.tracked`), the call's metric (`call.recorded`, with the status of
    the error given to `close`), the tenant slot (released early once the engine is done),
    and the engine rows (cancelled at `close` if still running).
    """

    def __init__(
        self,
        call: GenerationCall,
        build: Callable[[], list[GenerationRequest]],
        executor: Executor,
    ) -> None:
        self.call = call
        self._build = build
        self._executor = executor
        self._held = ExitStack()
        self._slot = False
        self._streams: list[LoopStream] = []
        self._index = 0
        self._closed = False

    async def start(self) -> None:
        """Admission: build the requests on a pool thread, check rates, wait for a slot
        (no thread), submit. Raises what refused the call; `close` it either way."""
        call = self.call
        self._held.enter_context(call.state.tracked())
        self._held.enter_context(call.recorded())
        loop = asyncio.get_running_loop()
        requests = await loop.run_in_executor(self._executor, self._build)
        call.admit()
        bell = Doorbell.of_running_loop()
        await tenant_slot(call.state.gate, call.principal, lambda: call.cancelled, bell)
        self._slot = True
        submitted: Sequence[RequestStream] = call.submit(requests)
        self._streams = [LoopStream(s, bell, self._one_final) for s in submitted]
        for stream in self._streams:  # finals handed over before their reader listened
            stream.check_final()

    def _one_final(self, stream: LoopStream) -> None:
        """A stream's final event is due: its tokens count now (rates, metrics), read or
        not, as the thread-based path counts them when the engine ends the request (also
        one cancelled because its client went away). Once all are due, the engine is done
        with the call and the slot goes back, whether or not the reader has taken them."""
        final = stream.stream.final
        assert final is not None
        self.call.account(final)
        if all(s.final_seen for s in self._streams):
            self._release_slot()

    def _release_slot(self) -> None:
        if self._slot:
            self._slot = False
            self.call.state.gate.leave(self.call.principal.tenant)

    async def next(self) -> tuple[int, TokenEvent] | None:
        """The next (choice index, event); None once every request finished. A call of
        several requests (prompts x n) reads them one after the other: the engine runs
        them together meanwhile, so a later choice's events come in few pieces. Raises a
        failed finish as its error (`GenerationCall.observe`)."""
        if self._index >= len(self._streams):
            return None
        index = self._index
        event = await self._streams[index].next_event()
        event = self.call.observe(event, timed=index == 0, account=False)  # see _one_final
        if event.finished:
            self._index += 1
        return index, event

    def close(self, error: BaseException | None = None) -> None:
        """End the call (idempotent): rows cancelled, slot released, the call counted with
        `error`'s status (a caller gone, or the task cancelled: CANCELLED)."""
        if self._closed:
            return
        self._closed = True
        self.call.end([s.stream for s in self._streams])
        self._release_slot()
        if error is not None and not isinstance(error, LoramuxError | Exception):
            error = Cancelled(None, "the client went away")
        if error is None:
            self._held.close()
        else:
            self._held.__exit__(type(error), error, error.__traceback__)
