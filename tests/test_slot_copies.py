"""Installs into device slots and when a slot may first be used (slot_copies.py), on the
real engine on the CPU.

On CUDA an install runs on a side stream and an event says when it is done; the CPU's
copies are done when they return, so to see the ordering the store and the engine keep
(a slot is never handed to a request before its install is done; the other tenants'
steps go on meanwhile) this test holds an install open as a side stream's event would
report a copy still running, and lets it finish when it chooses. Everything else is the
real engine, store and layers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from api_helpers import linear_shapes

from loramux.core.config import Settings
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.engine import Engine
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams
from loramux.server.slot_copies import SyncCopies, make_slot_copies
from loramux.server.synthetic import write_random_adapter


class HeldCopies(SyncCopies):
    """The CPU's copies, reported pending until `done` is set (what a CUDA event's
    `query()` says while the side stream still copies)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.installed: list[int] = []
        self.used: list[int] = []
        self.settled = 0

    def copying(self, slot: int) -> contextlib.AbstractContextManager[None]:
        self.installed.append(slot)
        return super().copying(slot)

    def ready(self, slot: int) -> bool:
        return slot not in self.installed or self.done.is_set()

    def use(self, slot: int) -> None:
        assert self.ready(slot), "a slot was handed out before its install was done"
        self.used.append(slot)

    def settle(self) -> None:
        self.settled += 1

    @property
    def pending(self) -> bool:
        return bool(self.installed) and not self.done.is_set()

    def wait_on_host(self) -> None:
        self.done.wait()


@pytest.fixture
def engine(tiny_llama: ResolvedModel, tmp_path: Path) -> Iterator[Engine]:
    engine = Engine(
        load_base_model(tiny_llama, "nf4", "cpu"),
        load_tokenizer(tiny_llama),
        Settings(max_loaded_adapters=2, max_batch_size=4),
        tiny_llama,
    )
    shapes = linear_shapes(tiny_llama.path)
    for i, rank in enumerate((8, 16)):
        folder = write_random_adapter(tmp_path / f"a{i}", shapes, rank=rank, seed=i, scale=0.5)
        engine.adapters.register(f"a{i}", folder)
    yield engine
    engine.shutdown()


def _request(engine: Engine, name: str, adapter: str | None, tokens: int) -> GenerationRequest:
    prompt = engine.render_chat([("user", "What is the capital of France?")])
    return GenerationRequest(name, prompt, SamplingParams(max_new_tokens=tokens), adapter)


def test_the_cpu_copies_synchronously() -> None:
    copies = make_slot_copies(torch.device("cpu"))
    assert isinstance(copies, SyncCopies) and not copies.pending and copies.ready(1)


def test_an_adapter_is_not_used_before_its_copy_is_done(engine: Engine) -> None:
    """A request on an adapter whose install is still pending stays queued while a base
    request runs to its end (the other tenants' steps go on); once the install is done the
    engine hands its slot out and the request gets the tokens it gets without the wait."""
    expected = [t for e in engine.submit(_request(engine, "ref", "a0", 6)) for t in e.token_ids]
    engine.adapters.unload("a0")
    copies = HeldCopies()
    engine.adapters.copies = copies
    engine.adapters.load("a0")  # installed into a slot, its copy held pending
    assert copies.installed and not copies.used

    # Both arrive in one step (submitted between steps, on the engine thread).
    held, base_stream = engine.run_on_engine_thread(
        lambda: (
            engine.submit(_request(engine, "held", "a0", 6)),
            engine.submit(_request(engine, "base", None, 8)),
        )
    )
    base = list(base_stream)
    assert base[-1].finish_reason is FinishReason.LENGTH
    assert sum(len(e.token_ids) for e in base) == 8
    # Eight steps ran; the adapter's slot was never handed out.
    assert not copies.used
    assert engine.adapters.state("a0") == "device"
    assert held.poll() is None
    assert engine.stats().queued == 1

    copies.done.set()  # the copy finished: the engine, waiting on it, admits the request
    events = list(held)
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert [t for e in events for t in e.token_ids] == expected
    assert copies.used == copies.installed[:1]


def test_a_stack_resize_waits_for_pending_copies(engine: Engine) -> None:
    """A new rank class replaces the groups' stacks (their rows are copied over) on the
    compute stream: every install still pending is waited for first (`settle`)."""
    copies = HeldCopies()
    copies.done.set()
    engine.adapters.copies = copies
    engine.adapters.load("a0")  # rank 8: the first rank class, new stacks
    assert copies.settled == 1
    engine.adapters.load("a1")  # rank 16: another class
    assert copies.settled == 2
    engine.adapters.unload("a1")  # the class emptied: its stacks go
    assert copies.settled == 3
    engine.adapters.load("a1")
    engine.adapters.unload("a0")
    settled = copies.settled
    engine.adapters.load("a0")  # the rank-8 class again, its stacks made anew
    assert copies.settled == settled + 1
