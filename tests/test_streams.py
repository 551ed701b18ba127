"""How a request's tokens reach its reader: every token in order, the finish last, and with
--stream-interval N a wake (and a gRPC message) per N tokens instead of one per token."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from api_helpers import eventually
from hardening_helpers import tiny_server

from loramux.client import LoramuxClient
from loramux.core.config import Settings
from loramux.core.errors import Cancelled
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.aio import Doorbell, LoopStream, tenant_slot
from loramux.server.app import RunningServer
from loramux.server.engine import Engine
from loramux.server.registry import Quota
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from loramux.server.streams import RequestStream
from loramux.server.tenants import ConcurrencyGate, Principal

NEW_TOKENS = 10
INTERVAL = 4
PROMPT = "Count the apples in the basket"


def _engine(tiny: ResolvedModel, interval: int) -> Engine:
    return Engine(
        load_base_model(tiny, "nf4", "cpu"),
        load_tokenizer(tiny),
        Settings(stream_interval=interval),
        tiny,
        enable_lora=False,
    )


@pytest.fixture(scope="module")
def engines(tiny_llama: ResolvedModel) -> Iterator[dict[int, Engine]]:
    engines = {interval: _engine(tiny_llama, interval) for interval in (1, INTERVAL)}
    yield engines
    for engine in engines.values():
        engine.shutdown()


def _events(engine: Engine, max_new_tokens: int = NEW_TOKENS) -> list[TokenEvent]:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return list(engine.submit(GenerationRequest("r", engine.tokenize(PROMPT), params)))


def test_at_interval_one_each_token_is_due_at_once() -> None:
    """Interval 1: an event is handed over as it is put, so a reader that keeps up gets one
    event per token (a reader's timing is not asserted: see the tests below)."""
    stream = RequestStream("r", prompt_tokens=3, wake=lambda: None)
    for token, text in ((5, "a"), (6, "b")):
        stream._put(TokenEvent((token,), text))
        assert stream.next_event() == TokenEvent((token,), text)


def test_a_reader_behind_gets_what_piled_up_as_one_event() -> None:
    """Interval 1: the engine's events wait for a slow reader, which takes them at once,
    merged in order with the finish last, instead of waking once per token."""
    stream = RequestStream("r", prompt_tokens=3, wake=lambda: None)
    for token, text in ((5, "a"), (6, "b"), (7, "c")):
        stream._put(TokenEvent((token,), text))
    stream._put(TokenEvent((8,), "d", FinishReason.LENGTH, prompt_tokens=3, completion_tokens=4))
    events = list(stream)
    assert events == [
        TokenEvent((5, 6, 7, 8), "abcd", FinishReason.LENGTH, prompt_tokens=3, completion_tokens=4)
    ]


def test_the_reader_wakes_once_per_interval(engines: dict[int, Engine]) -> None:
    """Interval 4: every event before the last carries at least 4 tokens, the last the rest
    and the finish; the tokens and text are exactly interval 1's. (Interval 1 gives one
    event per token only while its reader keeps up; one that falls behind, as a busy
    machine's test thread may, takes what piled up as one event: the test below.)"""
    single = _events(engines[1])
    batched = _events(engines[INTERVAL])
    assert sum(len(e.token_ids) for e in single) == NEW_TOKENS
    assert all(len(e.token_ids) >= INTERVAL for e in batched[:-1])
    assert len(batched) <= -(-NEW_TOKENS // INTERVAL)
    assert [t for e in batched for t in e.token_ids] == [t for e in single for t in e.token_ids]
    assert "".join(e.text for e in batched) == "".join(e.text for e in single)
    assert not any(e.finished for e in batched[:-1])
    final = batched[-1]
    assert final.finish_reason is FinishReason.LENGTH
    assert final.completion_tokens == NEW_TOKENS


def test_a_request_shorter_than_the_interval_still_ends(engines: dict[int, Engine]) -> None:
    events = _events(engines[INTERVAL], max_new_tokens=2)
    assert len(events) == 1 and len(events[0].token_ids) == 2 and events[0].finished


def test_stream_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--stream-interval"):
        Settings(stream_interval=0).validate()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: ResolvedModel
) -> Iterator[RunningServer]:
    running = tiny_server(
        tmp_path_factory.mktemp("streams") / "home",
        tiny_llama,
        admin_keys=[],
        dev=True,
        stream_interval=INTERVAL,
        max_new_tokens_limit=400,
    )
    yield running
    running.close()


def test_grpc_stream_sends_a_message_per_interval(server: RunningServer) -> None:
    with LoramuxClient(f"127.0.0.1:{server.port}") as client:
        unary = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        chunks = list(client.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert all(len(c.token_ids) >= INTERVAL for c in chunks[:-1])
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == unary.finish_reason == "length"
    assert chunks[-1].completion_tokens == NEW_TOKENS


def test_grpc_cancel_mid_interval_frees_the_row(server: RunningServer) -> None:
    engine = server.state.engine
    with LoramuxClient(f"127.0.0.1:{server.port}") as client:
        stream = client.generate_stream(PROMPT, max_new_tokens=400, ignore_eos=True)
        first = next(stream)
        assert len(first.token_ids) >= INTERVAL
        assert engine.stats().running == 1
        stream.close()  # cancels the call
        assert eventually(lambda: engine.stats().running == 0)
        after = client.generate(PROMPT, max_new_tokens=3, ignore_eos=True)  # still serving
    assert len(after.token_ids) == 3


# ---- a reader on an event loop: no thread waits (issue 29) ----


def test_an_unarmed_reader_costs_the_engine_no_wake_up_until_the_finish() -> None:
    """The engine hands events over without waiting for the reader, and calls `notify` only
    for an armed reader (one wake-up, then disarmed) and for the final event; what piled up
    meanwhile is taken at once, merged."""
    stream = RequestStream("r", prompt_tokens=3, wake=lambda: None)
    notified: list[int] = []
    stream.listen(lambda: notified.append(1))
    assert stream.poll() is None
    stream.arm()
    stream._put(TokenEvent((1,), "a"))
    stream._put(TokenEvent((2,), "b"))
    assert len(notified) == 1, "one wake-up per arm, however many events follow"
    for token in range(3, 1000):  # a reader that fell behind: nothing wakes it
        stream._put(TokenEvent((token,), "x"))
    assert len(notified) == 1
    assert stream.final is None
    stream._put(
        TokenEvent((1000,), "y", FinishReason.LENGTH, prompt_tokens=3, completion_tokens=1000)
    )
    assert len(notified) == 2 and stream.final is not None, "the finish always notifies"
    event = stream.poll()
    assert event is not None and event.token_ids == tuple(range(1, 1001)) and event.finished
    assert stream.poll() is None


def test_loop_streams_and_the_gate_line_wait_without_a_thread() -> None:
    """On one event loop: a call in line for its tenant's only slot waits as a callback,
    gets the slot when the holder leaves (from another thread), and a caller that goes
    away leaves the line with Cancelled; events put from another thread reach the loop's
    reader through the doorbell, merged when it fell behind."""
    gate = ConcurrencyGate()
    tenant = Principal("t", admin=False, quota=Quota(1, 2, 1, 1))
    gone = threading.Event()

    async def scenario() -> None:
        bell = Doorbell.of_running_loop()
        await tenant_slot(gate, tenant, lambda: False, bell)  # free: taken at once
        second = asyncio.ensure_future(tenant_slot(gate, tenant, lambda: False, bell))
        third = asyncio.ensure_future(tenant_slot(gate, tenant, gone.is_set, bell))
        await asyncio.sleep(0)  # one turn of the loop (not a wait): both join the line
        assert gate.waiting() == {"t": 2} and threading.active_count() == threads
        gone.set()
        await asyncio.to_thread(gate.wake)  # the third caller went away
        with pytest.raises(Cancelled):
            await third
        await asyncio.to_thread(gate.leave, "t")  # the holder finishes, on another thread
        await second
        assert gate.in_flight() == {"t": 1} and gate.waiting() == {}
        gate.leave("t")

        stream = RequestStream("r", prompt_tokens=1, wake=lambda: None)
        finals: list[LoopStream] = []
        reader = LoopStream(stream, bell, finals.append)

        def engine() -> None:
            for token in range(5):
                stream._put(TokenEvent((token,), str(token)))
            stream._put(TokenEvent((5,), "5", FinishReason.LENGTH, 1, 6))

        await asyncio.to_thread(engine)
        event = await reader.next_event()
        assert event.token_ids == (0, 1, 2, 3, 4, 5) and event.finished
        assert finals == [reader], "the final hand-over reached the loop"

    threads = threading.active_count()
    asyncio.run(scenario())
