"""Copies of adapter weights into device slots, and when a slot may first be used.

The adapter store installs an adapter into a slot on the engine thread between steps
(adapter_store.py). On CUDA those copies run on a side stream (`StreamCopies`): the steps
of the running batch, on the compute stream, do not wait for them, and an event recorded
after the copies says when they are done. The rule that keeps this sound lives in the
store and is the same for every device: **a slot is handed to a request only once its
copy is done** (`ready`); until then the request stays queued, as it does while an
adapter loads from disk, and the rest of the batch goes on. When it is handed out, the
compute stream waits on the event (`use`: a no-op by then, and the ordering CUDA needs
anyway). Rows of a slot nobody is routed to are read by no step, so writing them on
another stream races with nothing.

Two more rules, for what the side stream cannot do alone:

* the slot stacks are resized (`LoraGroup.fit`: a new rank class, a grown one) on the
  compute stream before the side stream starts (`start` makes the side stream wait for
  the compute stream's work so far), and a resize that copies the old stacks into new
  ones first makes the compute stream wait for every copy still pending (`settle`), or
  it would copy rows still being written;
* with nothing else to run, the engine waits for a pending copy on the host
  (`wait_on_host`): there is no other tenant's step to keep going, and nothing else would
  wake the loop.

On the CPU (`SyncCopies`) the copies run on the caller's thread and are done when `start`
returns: nothing is ever pending. The CUDA implementation has never run (no GPU has been
lent to this project); its ordering logic is the store's, tested on the CPU with a copy
held open (tests/test_slot_copies.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch


class SlotCopies(Protocol):
    """Where slot installs run, and whether a slot's install is done."""

    name: str

    def copying(self, slot: int) -> contextlib.AbstractContextManager[None]:
        """Context in which the install of `slot` issues its device writes; on exit the
        install is recorded as pending until the device has done it."""
        ...

    def ready(self, slot: int) -> bool:
        """Whether the last install of `slot` is done (True when none is pending)."""
        ...

    def use(self, slot: int) -> None:
        """Order the compute stream after the install of `slot` (call once `ready`)."""
        ...

    def settle(self) -> None:
        """Order the compute stream after every pending install (before a resize)."""
        ...

    @property
    def pending(self) -> bool:
        """Whether some install is not done yet."""
        ...

    def wait_on_host(self) -> None:
        """Block until every pending install is done (only when nothing else runs)."""
        ...


class SyncCopies:
    """CPU: the copies run where they are issued and are done when they return."""

    name = "sync"

    @contextlib.contextmanager
    def copying(self, slot: int) -> Iterator[None]:
        yield

    def ready(self, slot: int) -> bool:
        return True

    def use(self, slot: int) -> None:
        pass

    def settle(self) -> None:
        pass

    @property
    def pending(self) -> bool:
        return False

    def wait_on_host(self) -> None:
        pass


class StreamCopies:
    """CUDA: installs on a side stream, an event per slot (never run on a GPU yet)."""

    name = "side-stream"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._side = torch.cuda.Stream(device)
        self._events: dict[int, torch.cuda.Event] = {}  # slot -> its install's event

    @contextlib.contextmanager
    def copying(self, slot: int) -> Iterator[None]:
        compute = torch.cuda.current_stream(self.device)
        # The stacks fitted and rows zeroed on the compute stream come first.
        self._side.wait_stream(compute)
        with torch.cuda.stream(self._side):
            yield
        event = torch.cuda.Event()
        event.record(self._side)
        self._events[slot] = event

    def ready(self, slot: int) -> bool:
        event = self._events.get(slot)
        return event is None or bool(event.query())

    def use(self, slot: int) -> None:
        event = self._events.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def settle(self) -> None:
        compute = torch.cuda.current_stream(self.device)
        for event in self._events.values():
            compute.wait_event(event)
        self._events.clear()

    @property
    def pending(self) -> bool:
        return any(not event.query() for event in self._events.values())

    def wait_on_host(self) -> None:
        for event in list(self._events.values()):
            event.synchronize()


def make_slot_copies(device: torch.device) -> SlotCopies:
    """The install path for this device, chosen once at start."""
    return StreamCopies(device) if device.type == "cuda" else SyncCopies()
