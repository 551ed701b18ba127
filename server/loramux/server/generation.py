"""One generation call, whatever the transport carried it.

Both the gRPC servicer and the OpenAI-compatible HTTP front run a generation the same
way: resolve the adapter within the caller's tenant (another tenant's private adapter is
NOT_FOUND), wait for one of the tenant's concurrency slots, submit to the engine, read the
token events while timing them for the latency histograms, and count the call with its
final status. A transport only turns its request into a `GenerationRequest` and the events
back into its own messages, and calls `cancel()` when its client goes away.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from loramux.core.errors import Cancelled, FailedPrecondition, LoramuxError, NotFound
from loramux.server.affinity import ROUTE_KEY_METADATA
from loramux.server.composition import WeightedAdapter, check_weights
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from loramux.server.state import ServerState, register_record
from loramux.server.streams import RequestStream
from loramux.server.tenants import Principal
from loramux.server.versions import check_key

BASE_LABEL = "base"
UNKNOWN_LABEL = "unknown"
COMPOSED_LABEL = "composed"  # several weighted adapters (bounded metric cardinality)


class GenerationCall:
    """One caller's generation: adapter, tenant slot, engine stream, metrics.

    `cancel()` may come from any thread at any point (client gone): it frees the caller's
    place in the tenant's wait line at once and its engine row at the next engine step.
    """

    def __init__(
        self, state: ServerState, principal: Principal, route_key: str | None = None
    ) -> None:
        self.state = state
        self.principal = principal
        # The caller's sticky key: every request of one key lands on one version of a
        # weighted alias (versions.py); None: picked at random.
        self.route_key = check_key(route_key, ROUTE_KEY_METADATA)
        # "owner/name@vN" once resolved (the version: a canary is judged by its metrics),
        # "unknown" if not found
        self.adapter_label = BASE_LABEL
        self.started = time.monotonic()
        self.last_token: float | None = None
        self._gone = threading.Event()
        self._streams: list[RequestStream] = []
        # (field, ref, engine id) of adapters this call made known to the engine: their
        # rows may be deleted between the lookup and the registration (`_deleted_meanwhile`)
        self._registered: list[tuple[str, str, str]] = []

    def resolve(self, ref: str | None) -> str | None:
        """The engine id of adapter `ref` (`[owner/]name[@version|@alias]`); None for the base.

        A weighted alias is resolved here, once, at admission: the request finishes on the
        version picked even if the alias moves while it runs.
        """
        if not ref:
            return None
        self.adapter_label = UNKNOWN_LABEL
        record = self.state.registry.find(self.principal.tenant, ref, key=self.route_key)
        self.adapter_label = record.ref
        if record.engine_id not in self.state.engine.adapters:
            register_record(self.state, record)
            self._registered.append(("adapter", record.ref, record.engine_id))
        return record.engine_id

    def resolve_weighted(self, entries: Sequence[tuple[str, float]], field: str) -> str | None:
        """The engine id serving adapters with weights (GenerateRequest.adapters): bounded,
        each name resolved as `resolve` does; None when every weight is 0 (the base)."""
        settings = self.state.settings
        check_weights(entries, settings.max_composed_adapters, settings.max_adapter_weight, field)
        parts, labels = [], []
        self.adapter_label = UNKNOWN_LABEL
        for i, (ref, weight) in enumerate(entries):
            try:
                record = self.state.registry.find(self.principal.tenant, ref, key=self.route_key)
            except NotFound as error:
                raise NotFound(f"{field}[{i}].name", str(error).split(": ", 1)[-1]) from None
            if record.engine_id not in self.state.engine.adapters:
                register_record(self.state, record)
                self._registered.append((f"{field}[{i}].name", record.ref, record.engine_id))
            parts.append(WeightedAdapter(record.engine_id, weight))
            labels.append(record.ref)
        self.adapter_label = labels[0] if len(labels) == 1 else COMPOSED_LABEL
        return self.state.engine.adapters.weighted(parts)

    def _deleted_meanwhile(self) -> None:
        """Raise NOT_FOUND if an adapter this call registered was deleted meanwhile.

        Between this call's lookup of the row and its registration with the engine, a
        delete may have run in full (entry evicted, files removed): the registration then
        brought back an adapter with no files, and its load failed. The caller gets what it
        would have got had the delete come first, and the stale entry goes.
        """
        for field, ref, engine_id in self._registered:
            try:
                current = self.state.registry.find(self.principal.tenant, ref).engine_id
            except NotFound:
                current = None
            if current != engine_id:
                with contextlib.suppress(NotFound):
                    self.state.engine.adapters.unregister(engine_id)
                raise NotFound(field, f"adapter {ref!r} was deleted")

    def request(
        self,
        adapter: str | None,
        prompt: Callable[[], list[int]],
        params: Callable[[list[int]], SamplingParams],
        *,
        request_id: str,
        deadline: float | None = None,
        weighted: Sequence[tuple[str, float]] | None = None,
    ) -> GenerationRequest:
        """The engine request both transports build: adapter, prompt, checked parameters.

        In this order: the adapter resolved within the caller's tenant (an unknown one is
        refused before any tokenising), the prompt tokenised, then the decoding parameters
        (which may depend on the prompt's length) checked against the server's limits.
        `weighted` (adapters with weights, GenerateRequest.adapters) replaces `adapter`.
        """
        (one,) = self.requests(
            adapter,
            lambda: [prompt()],
            params,
            request_id=request_id,
            deadline=deadline,
            weighted=weighted,
        )
        return one

    def requests(
        self,
        adapter: str | None,
        prompts: Callable[[], list[list[int]]],
        params: Callable[[list[int]], SamplingParams],
        *,
        request_id: str,
        n: int = 1,
        deadline: float | None = None,
        weighted: Sequence[tuple[str, float]] | None = None,
    ) -> list[GenerationRequest]:
        """`request` for several prompts and `n` samples of each, prompt by prompt.

        Sample j of a seeded request draws with seed + j, so that the samples differ and
        the request stays reproducible. Only the first sample of a prompt scores it
        (prompt_logprobs): the others take its KV blocks from the prefix cache instead of
        recomputing them, and the caller copies its scores. Each engine request is
        `request_id`-k for choice k when there are several.
        """
        if weighted is not None:
            adapter_id = self.resolve_weighted(weighted, "adapters")
        else:
            adapter_id = self.resolve(adapter)
        out = []
        token_lists = prompts()
        for i, token_ids in enumerate(token_lists):
            checked = params(token_ids)
            checked.validate(self.state.settings.max_new_tokens_limit)
            # compiled here, on the admitting thread and before a tenant slot is taken
            grammar = (
                self.state.engine.grammars.compile(checked.constraint)
                if checked.constraint is not None
                else None
            )
            for j in range(n):
                sample = checked
                if j:
                    seed = None if checked.seed is None else (checked.seed + j) % 2**64
                    scored = checked.prompt_logprobs if checked.max_new_tokens == 0 else None
                    sample = replace(checked, seed=seed, prompt_logprobs=scored)
                several = n > 1 or len(token_lists) > 1
                out.append(
                    GenerationRequest(
                        request_id=f"{request_id}-{i * n + j}" if several else request_id,
                        prompt_token_ids=token_ids,
                        params=sample,
                        adapter_id=adapter_id,
                        deadline=deadline,
                        grammar=grammar,
                    )
                )
        return out

    def cancel(self) -> None:
        self._gone.set()
        if not self._streams:  # it may be in its tenant's line: make the line re-check
            # (once submitted it holds a slot instead; waking every waiter of every tenant
            # for each finished stream would be wasted, hundreds of them with slow readers)
            self.state.gate.wake()
        for stream in list(self._streams):
            stream.cancel()

    @property
    def cancelled(self) -> bool:
        return self._gone.is_set()

    @contextmanager
    def recorded(self) -> Iterator[None]:
        """Count the call in `loramux_requests_total` with its final status."""
        status = "INTERNAL"
        try:
            yield
            status = "OK"
        except LoramuxError as error:
            status = error.code
            raise
        except GeneratorExit:  # the transport closed the response: the client went away
            status = "CANCELLED"
            raise
        finally:
            self.state.metrics.request_done(
                self.principal.tenant, self.adapter_label, status, time.monotonic() - self.started
            )

    def admit(self) -> None:
        """Before waiting for a slot: refuse a call whose caller left, or over its rates
        (a refusal costs no slot)."""
        if self._gone.is_set():
            raise Cancelled(None, "the call ended before generation started")
        self.state.rates.admit(self.principal)

    def submit(self, requests: Sequence[GenerationRequest]) -> list[RequestStream]:
        """Hand the requests to the engine, the tenant's slot held; `end` them afterwards.
        The requests share cached KV blocks only with their own tenant's (`cache_scope`)."""
        streams: list[RequestStream] = []
        try:
            for request in requests:
                stream = self.state.engine.submit(
                    replace(request, cache_scope=self.principal.tenant)
                )
                self._streams.append(stream)
                streams.append(stream)
        except BaseException:
            self.end(streams)
            raise
        if self._gone.is_set():  # ended between the slot and the submit
            self.end(streams)
        return streams

    @staticmethod
    def end(streams: Sequence[RequestStream]) -> None:
        """Cancel the streams: a no-op once finished; frees the rows if the caller left."""
        for stream in streams:
            stream.cancel()

    def account(self, final: TokenEvent) -> None:
        """Count a finished request's tokens against its tenant's rates and in the metrics."""
        self.state.rates.spend(self.principal.tenant, final.completion_tokens)
        self.state.metrics.tokens(
            self.principal.tenant, self.adapter_label, final.prompt_tokens, final.completion_tokens
        )

    def observe(self, event: TokenEvent, timed: bool = True, account: bool = True) -> TokenEvent:
        """Time an event's tokens for the latency histograms, count the finished request's
        tokens (rates, metrics; `account` False: the caller counts them with `account`);
        raises on a failed finish.

        An event may carry several tokens (`--stream-interval`, or a reader that fell
        behind): the caller receives them together, so the first one's latency is the gap
        since the last token and the others' is 0. `timed` False: a call's later choices,
        read after the first (their tokens came meanwhile) are not timed.
        """
        metrics = self.state.metrics
        if event.token_ids and timed:
            now = time.monotonic()
            if self.last_token is None:
                metrics.ttft.observe(now - self.started)
            else:
                metrics.itl.observe(now - self.last_token)
            for _ in event.token_ids[1:]:
                metrics.itl.observe(0.0)
            self.last_token = now
        if event.finished:
            if account:
                self.account(event)
            if event.error is not None:
                if isinstance(event.error, FailedPrecondition):
                    self._deleted_meanwhile()
                raise event.error
            if event.finish_reason is FinishReason.CANCELLED:
                raise Cancelled(None, "the request was cancelled")
        return event
