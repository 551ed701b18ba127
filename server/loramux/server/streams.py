"""RequestStream: the consumer's end of one engine request.

The engine thread puts one `TokenEvent` per token (and a final one); a consumer (a
transport's call on its event loop, below; a test's or a benchmark's thread) takes them.
Every time a consumer wakes it costs more than its own Python: on a 2-CPU machine whose
two cores run the engine's OpenMP team, each wake preempts a team thread in the middle of
a parallel op, and each event becomes a message to send.

So the consumer wakes only when `interval` events are pending or the request finished,
and takes everything pending as ONE event (`TokenEvent.merged`: tokens and text in order,
the finish reason and usage of the last). With interval 1 (the default, `--stream-interval`)
every token is delivered as soon as the engine made it; a consumer that fell behind gets
what piled up in one piece instead of one event each. Measured in docs/performance.md
("Through the gRPC server").

A consumer on an event loop (both transports' generations, aio.py) holds no thread while
it waits: it calls `listen(notify)` once, then `poll()` for what is due, and when nothing
is it `arm()`s the stream and awaits its own wake-up. The engine thread calls `notify`
(which must be cheap and must not raise: it only schedules a wake-up on the loop) when it
hands events over to an armed stream, and always with the final event; an unarmed stream
(its reader still busy with, or unable to send, the previous events) costs the engine an
append and nothing more. What waits for a reader is one list per request, whose length is
bounded by the request's own tokens (`max_tokens`): the reader takes it all, merged, when
it next asks.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

from loramux.server.requests import TokenEvent


class RequestStream:
    """The consumer's end of one request: iterate for TokenEvents, or cancel."""

    def __init__(
        self, request_id: str, prompt_tokens: int, wake: Callable[[], None], interval: int = 1
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.interval = interval
        self._pending: list[TokenEvent] = []  # engine thread only: not yet handed over
        # Batches of events handed to the consumer: a C-level queue, so a put costs the
        # engine thread no Python lock dance (a threading.Condition's notify cost 2% of
        # its time at batch 32, py-spy).
        self._due: queue.SimpleQueue[list[TokenEvent]] = queue.SimpleQueue()
        self._wake = wake
        self.cancelled = False
        self._notify: Callable[[], None] | None = None  # set by an event-loop consumer
        self._armed = False  # that consumer waits: notify at the next hand-over
        # The finished event, once due (the engine is done with the request): an event-loop
        # consumer counts its tokens when it is handed over, read or not.
        self.final: TokenEvent | None = None

    def _put(self, event: TokenEvent) -> None:
        """Engine thread only: add an event; hands the pending ones over when they are due
        (`interval` of them, or a finish)."""
        self._pending.append(event)
        if event.finished or len(self._pending) >= self.interval:
            self._due.put(self._pending)
            self._pending = []
            if event.finished:
                # before `_notify` is read: a consumer that starts listening after that
                # read finds `final` set when it checks (`listen`, then `final`)
                self.final = event
            notify = self._notify
            if notify is not None and (self._armed or event.finished):
                self._armed = False
                notify()

    def listen(self, notify: Callable[[], None]) -> None:
        """Consumer on an event loop: call `notify` (from the engine thread) when events
        become due while armed, and once the final one is due. Set before the first `arm`;
        check `final` after it (a final handed over before it is not notified)."""
        self._notify = notify

    def arm(self) -> None:
        """The consumer is about to wait: the next hand-over notifies. Arm, THEN `poll`: an
        event handed over between the two is either seen by the poll or notified."""
        self._armed = True

    def poll(self) -> TokenEvent | None:
        """Everything due, merged into one event; None when nothing is (never blocks).
        Taking something disarms: the reader is busy with it, the engine need not wake it."""
        events: list[TokenEvent] = []
        while True:
            try:
                events += self._due.get_nowait()
            except queue.Empty:
                break
        if not events:
            return None
        self._armed = False
        return TokenEvent.merged(events)

    def cancel(self) -> None:
        """The request leaves the batch at the next engine step."""
        self.cancelled = True
        self._wake()

    def next_event(self) -> TokenEvent:
        """Block until events are due; all of those handed over, merged into one."""
        events = self._due.get()
        while True:
            try:
                events = events + self._due.get_nowait()
            except queue.Empty:
                return TokenEvent.merged(events)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self.next_event()
            yield event
            if event.finished:
                return
