"""RequestStream: the consumer's end of one engine request.

The engine thread puts one `TokenEvent` per token (and a final one); a consumer thread (a
gRPC handler, the HTTP bridge, a test) iterates the stream. Every time a consumer thread
wakes it costs more than its own Python: on a 2-CPU machine whose two cores run the
engine's OpenMP team, each wake preempts a team thread in the middle of a parallel op,
and through gRPC each event becomes a message whose send wakes two more threads (the
handler waits for the send to complete, gRPC's poller thread reports it).

So the consumer wakes only when `interval` events are pending or the request finished,
and takes everything pending as ONE event (`TokenEvent.merged`: tokens and text in order,
the finish reason and usage of the last). With interval 1 (the default, `--stream-interval`)
every token is delivered as soon as the engine made it; a consumer that fell behind gets
what piled up in one piece instead of one event each. Measured in docs/performance.md
("Through the gRPC server").
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

    def _put(self, event: TokenEvent) -> None:
        """Engine thread only: add an event; hands the pending ones over when they are due
        (`interval` of them, or a finish)."""
        self._pending.append(event)
        if event.finished or len(self._pending) >= self.interval:
            self._due.put(self._pending)
            self._pending = []

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
