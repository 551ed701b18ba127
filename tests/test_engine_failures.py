"""A failed engine step fails only what it touched (issue 11, point 4).

A real engine on the tiny random Llama; the failure is injected into the model itself (a
forward hook on the embedding that raises on prefill-shaped input, T > 1), not by mocking
the engine. Requests whose prefill fails must end with a status and give back their adapter
slot; the request already decoding must go on, token for token as without the failure.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from loramux.core.config import Settings
from loramux.core.errors import Internal, ResourceExhausted
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.engine import Engine, RequestStream
from loramux.server.lora import base_linear_shapes
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from loramux.server.synthetic import write_random_adapter

LONG = 300  # tokens the undisturbed request decodes; it is running when the others fail


class PrefillFailure:
    """Raises `error` from the embedding on every prefill while armed (decode has T == 1)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self.running_when_raised: list[int] = []
        embed = engine.model.get_input_embeddings()
        self.handle = embed.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        input_ids = args[0]
        if self.error is not None and input_ids.shape[1] > 1:
            self.running_when_raised.append(self.engine.stats().running)
            raise self.error


@pytest.fixture(scope="module")
def engine(tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    model = load_base_model(tiny_llama, "nf4", "cpu")
    folder = write_random_adapter(
        tmp_path_factory.mktemp("adapter") / "a", base_linear_shapes(model), rank=4, alpha=8
    )
    engine = Engine(
        model,
        load_tokenizer(tiny_llama),
        Settings(max_new_tokens_limit=LONG, max_batch_size=4, max_loaded_adapters=2),
        tiny_llama,
        lora_kernel="eager",
    )
    engine.adapters.register("a", Path(folder))
    yield engine
    engine.shutdown()


def _request(name: str, prompt: list[int], adapter: str | None, tokens: int) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    return GenerationRequest(name, prompt, params, adapter_id=adapter)


def _collect(stream: RequestStream | Iterator[TokenEvent], timeout: float = 60) -> list[TokenEvent]:
    """Every event to the end; fails (instead of hanging) if the stream never ends."""
    events: list[TokenEvent] = []
    reader = threading.Thread(target=lambda: events.extend(stream), daemon=True)
    reader.start()
    reader.join(timeout)
    assert events and events[-1].finished, "the stream never ended"
    return events


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (torch.OutOfMemoryError("injected: out of memory in prefill"), ResourceExhausted),
        (RuntimeError("injected: bad adapter tensor"), Internal),
    ],
    ids=["oom", "bad-tensor"],
)
def test_failed_prefill_fails_only_its_requests(
    engine: Engine, error: BaseException, status: type[Exception]
) -> None:
    ids = engine.tokenize("Once upon a time there was a")
    reference = _tokens(_collect(engine.submit(_request("ref", ids, None, LONG))))
    engine.adapters.load("a")

    failure = PrefillFailure(engine)
    try:
        survivor = iter(engine.submit(_request("survivor", ids, None, LONG)))
        first = next(survivor)  # prefilled and decoding before anything fails
        failure.error = error
        doomed = [
            engine.submit(_request("with-adapter", ids[:4], "a", 8)),
            engine.submit(_request("base", ids[2:], None, 8)),
        ]
        ended = [_collect(stream)[-1] for stream in doomed]
        failure.error = None
        rest = _collect(survivor)
    finally:
        failure.handle.remove()

    for event in ended:
        assert event.finish_reason is FinishReason.ERROR
        assert isinstance(event.error, status)
    # The survivor was in the batch at every failed prefill (the prefilling requests are
    # in it too: with chunked prefill a prompt's rows join the batch before their chunks).
    assert failure.running_when_raised and min(failure.running_when_raised) >= 2
    assert rest[-1].finish_reason is FinishReason.LENGTH
    assert _tokens([first, *rest]) == reference  # the running request went on, unharmed
    # Every slot is back: the adapter can be evicted (unload waits for its refcount to
    # reach 0) and serves again; nothing is left queued or running.
    engine.adapters.unload("a", timeout=30)
    assert engine.adapters.state("a") == "stored"
    again = _collect(engine.submit(_request("again", ids, "a", 4)))
    assert again[-1].finish_reason is FinishReason.LENGTH
    assert engine.stats().queued == 0 and engine.stats().running == 0
