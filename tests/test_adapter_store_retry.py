"""Issue 11.5: a failed adapter load is retried by a later request (with backoff), not sticky.

One I/O error while the loader reads an adapter used to leave the error on the adapter for
good: every request failed until an admin loaded it by hand. The store here is the real
one (its loader thread reads real files); only the clock is the test's, so that the
backoff is crossed without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loramux.core.errors import FailedPrecondition
from loramux.core.models import ResolvedModel
from loramux.server.adapter_store import AdapterStore
from loramux.server.adapters import WEIGHTS_FILE
from loramux.server.lora import base_linear_shapes
from loramux.server.synthetic import write_random_adapter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tiny_llama: ResolvedModel, clock: Clock) -> Iterator[AdapterStore]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama.path))
    store = AdapterStore(
        {},  # no device layers: slots are bookkeeping only, the loader is what is tested
        base_linear_shapes(model),
        max_loaded=2,
        max_cpu=2,
        max_rank=16,
        wake_engine=lambda: None,
        module_names=[name for name, _ in model.named_modules()],
        retry_backoff=(1.0, 4.0),
        clock=clock,
    )
    yield store
    store.close()


def _loaded(store: AdapterStore) -> None:
    """Wait for the loader thread to finish what it was given (it notifies when done)."""
    with store._changed:
        assert store._changed.wait_for(lambda: not store.loading, timeout=60)


def test_failed_load_is_retried_by_a_later_request_after_backoff(
    store: AdapterStore, clock: Clock, tmp_path: Path
) -> None:
    folder = write_random_adapter(tmp_path / "a", base_linear_shapes_of(store), rank=8, alpha=16)
    store.register("a", folder)
    weights = folder / WEIGHTS_FILE
    hidden = tmp_path / "hidden"
    weights.rename(hidden)  # the disk hiccups while the loader reads it

    assert store.acquire("a", first_attempt=True) is None  # schedules the load
    _loaded(store)
    with pytest.raises(FailedPrecondition, match="cannot be loaded"):
        store.acquire("a", first_attempt=False)

    hidden.rename(weights)  # the disk is back
    with pytest.raises(FailedPrecondition, match="cannot be loaded"):
        store.acquire("a", first_attempt=True)  # within the backoff: fails fast, no new load
    assert not store.loading

    clock.now += 1.0  # past the first backoff: the next request tries again
    assert store.acquire("a", first_attempt=True) is None
    _loaded(store)
    slot = store.acquire("a", first_attempt=False)
    assert slot is not None
    store.release("a")


def test_backoff_doubles_up_to_its_limit(store: AdapterStore, clock: Clock, tmp_path: Path) -> None:
    folder = write_random_adapter(tmp_path / "a", base_linear_shapes_of(store), rank=8, alpha=16)
    store.register("a", folder)
    (folder / WEIGHTS_FILE).rename(tmp_path / "hidden")  # stays broken
    assert store.acquire("a", first_attempt=True) is None
    _loaded(store)
    for wait in (1.0, 2.0, 4.0, 4.0):  # retry_backoff=(1.0, 4.0)
        clock.now += wait - 0.25
        with pytest.raises(FailedPrecondition, match=f"retried after {wait:g} s"):
            store.acquire("a", first_attempt=True)
        clock.now += 0.25
        assert store.acquire("a", first_attempt=True) is None  # retries now
        _loaded(store)


def base_linear_shapes_of(store: AdapterStore):  # type: ignore[no-untyped-def]
    return store._base_linears
