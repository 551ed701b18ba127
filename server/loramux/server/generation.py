"""One generation call, transport-neutral: resolve, admit, submit, stream, count.

A front end (the gRPC servicer; an HTTP front next) turns its wire fields into plain
values, then uses these pieces in the same order:

    call = CallRecord.start(principal, adapter_named=bool(name))
    with recorded(state.metrics, call):
        adapter_id = resolve_adapter(state, principal, name, call)
        request = build_request(state, adapter_id=..., prompt=..., params=..., deadline=...)
        generation = Generation(state, principal)  # call generation.abandon() on disconnect
        with generation.submitted(request, timeout) as stream:
            for event in events(stream, call, state.metrics): ...

so tenant admission, cancellation and metrics are the same whatever the transport.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from loramux.core.errors import Cancelled, LoramuxError
from loramux.server.engine import RequestStream
from loramux.server.metrics import Metrics
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from loramux.server.state import ServerState, register_record
from loramux.server.tenants import Principal


@dataclass
class CallRecord:
    """Per-call bookkeeping for metrics: labels and token timing."""

    tenant: str
    adapter: str  # "base", "owner/name" once resolved, "unknown" when it was not found
    started: float = field(default_factory=time.monotonic)
    last_token: float | None = None

    @classmethod
    def start(cls, principal: Principal, *, adapter_named: bool) -> CallRecord:
        return cls(tenant=principal.tenant, adapter="unknown" if adapter_named else "base")


def resolve_adapter(
    state: ServerState, principal: Principal, name: str, call: CallRecord
) -> str | None:
    """The engine id of the adapter `name` as the caller sees it (None: the base model).

    Another tenant's private adapter is NOT_FOUND, exactly like a missing one.
    """
    if not name:
        return None
    record = state.registry.find(principal.tenant, name)
    call.adapter = f"{record.owner}/{record.name}"
    if record.engine_id not in state.engine.adapters:
        register_record(state, record)
    return record.engine_id


def build_request(
    state: ServerState,
    *,
    adapter_id: str | None,
    prompt: list[int],
    params: SamplingParams,
    deadline: float | None,
    request_id: str = "",
) -> GenerationRequest:
    """Fields in (adapter already resolved for the caller), the engine's request out."""
    params.validate(state.settings.max_new_tokens_limit)
    return GenerationRequest(
        request_id=request_id or uuid.uuid4().hex,
        prompt_token_ids=prompt,
        params=params,
        adapter_id=adapter_id,
        deadline=deadline,
    )


class Generation:
    """Waits for the tenant's slot and submits; `abandon()` when the caller goes away.

    A caller that cancels or disconnects at any point frees what it holds: its place in
    the tenant's wait line at once, its engine row at the next engine step.
    """

    def __init__(self, state: ServerState, principal: Principal) -> None:
        self.state = state
        self.principal = principal
        self.gone = threading.Event()
        self._streams: list[RequestStream] = []

    def abandon(self) -> None:
        self.gone.set()
        self.state.gate.wake()
        for submitted in self._streams:
            submitted.cancel()

    @contextmanager
    def submitted(
        self, request: GenerationRequest, timeout: float | None
    ) -> Iterator[RequestStream]:
        """Hold a tenant slot while the request runs."""
        state = self.state
        with state.gate.slot(self.principal, timeout, self.gone):
            stream = state.engine.submit(request)
            self._streams.append(stream)
            if self.gone.is_set():  # ended between the slot and the submit
                stream.cancel()
            yield stream


def events(stream: RequestStream, call: CallRecord, metrics: Metrics) -> Iterator[TokenEvent]:
    """The stream's events, timing first and later tokens; raises on a failed finish."""
    for event in stream:
        if event.token_ids:
            now = time.monotonic()
            if call.last_token is None:
                metrics.ttft.observe(now - call.started)
            else:
                metrics.itl.observe(now - call.last_token)
            call.last_token = now
        if event.finished:
            metrics.tokens(call.tenant, event.prompt_tokens, event.completion_tokens)
            if event.error is not None:
                raise event.error
            if event.finish_reason is FinishReason.CANCELLED:
                raise Cancelled(None, "the request was cancelled")
        yield event


@contextmanager
def recorded(metrics: Metrics, call: CallRecord) -> Iterator[CallRecord]:
    """Count the call in `loramux_requests_total` with its final status."""
    status = "INTERNAL"
    try:
        yield call
        status = "OK"
    except LoramuxError as error:
        status = error.code
        raise
    except GeneratorExit:  # the transport closed the response stream: the caller went away
        status = "CANCELLED"
        raise
    finally:
        metrics.request_done(call.tenant, call.adapter, status)
