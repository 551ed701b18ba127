"""Which threads may run parallel torch ops: the engine thread, and no other for long.

PyTorch's CPU ops run their parallel parts on OpenMP (libgomp on Linux). Every thread that
runs one keeps its own team of OpenMP workers for as long as it lives, and once the process
holds more OpenMP threads than it has CPUs, libgomp cuts its spin-wait between parallel
regions from ~300,000 iterations to 100. After that, each small op that follows a pause
of a few microseconds has to wake a sleeping worker through the kernel (~90 us measured in
a KVM guest). A decode step is hundreds of small LoRA ops between the base layers' kernels,
so on a 2-CPU machine where the main thread had loaded the model and the adapter loader
had converted a file, batch-32 decode with one adapter took 2.7x the base model's step
instead of 1.25x (`docs/performance.md`).

So: the engine thread sets the compute thread count for itself; the base model is loaded
on a thread that ends afterwards (its workers end with it); every other thread that
touches tensors (the adapter loader, gRPC handlers validating uploads) runs its torch ops
on one thread. `torch.set_num_threads` is per thread under OpenMP; a thread that never
called it takes the value last set anywhere in the process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def compute_thread_count(configured: int) -> int:
    """The engine's torch thread count: `configured`, or every available CPU when 0."""
    return configured if configured > 0 else available_cpus()


def use_compute_threads(count: int) -> None:
    """Called on the engine thread before its first op.

    `torch.get_num_threads()` first: torch gives each thread, at its first parallel op,
    the count last set anywhere in the process, unless that thread has already had its
    turn. Without it, the adapter loader's `use_one_thread()` (or any helper's) landing
    between this call and the engine's first op left the engine on ONE thread for the
    life of the process: a batch-32 decode step 68 ms instead of 47 ms on 2 CPUs, in
    every process whose engine did not run an op at start (docs/performance.md).
    """
    torch.get_num_threads()  # this thread's one-time initialisation, before the count
    torch.set_num_threads(count)


def use_one_thread() -> None:
    """Called at the start of helper threads that touch tensors (the adapter loader)."""
    torch.set_num_threads(1)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a block's torch ops serially, then restore this thread's count.

    On a thread that is not ours (a gRPC handler validating an upload), so it never starts
    OpenMP workers; and on the engine thread for adapter slot writes, hundreds of copies
    of 10-400 KB each, which run 2-5x faster without OpenMP's fork/join (measured: a
    rank-64 SmolLM2 adapter's install 16 -> 6.7 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def in_own_thread(work: Callable[[], T], name: str) -> T:
    """Run `work` on a thread that ends with it, so do the OpenMP workers its ops started.

    For one-off heavy work such as loading the base model: done on the main thread, it
    would leave a second team of workers alive for the life of the process.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # re-raised on the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
