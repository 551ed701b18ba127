"""The engine thread alone keeps parallel torch workers (see loramux.server.threads)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from loramux.core.config import Settings
from loramux.core.errors import Unavailable
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.engine import Engine
from loramux.server.threads import (
    available_cpus,
    compute_thread_count,
    in_own_thread,
    use_compute_threads,
    use_one_thread,
)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture(scope="module")
def engine(tiny_llama: ResolvedModel) -> Iterator[Engine]:
    engine = Engine(
        load_base_model(tiny_llama, "nf4", "cpu"),
        load_tokenizer(tiny_llama),
        Settings(compute_threads=1, max_batch_size=2),
        tiny_llama,
        lora_kernel="eager",
    )
    yield engine
    engine.shutdown()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_work_in_its_own_thread_leaves_no_thread_behind() -> None:
    before = os_threads()
    names: list[str] = []

    def work() -> float:
        names.append(threading.current_thread().name)
        torch.set_num_threads(max(2, available_cpus()))
        big = torch.ones(4_000_000)
        return float((big * 2).sum())  # parallel: starts this thread's OpenMP workers

    assert in_own_thread(work, "loader-test") == 8_000_000.0
    assert names == ["loader-test"]
    deadline = time.monotonic() + 5
    while os_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os_threads() <= before  # the thread and the workers it started are gone


def test_errors_in_its_own_thread_reach_the_caller() -> None:
    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        in_own_thread(fail, "failing")


def test_compute_thread_count() -> None:
    assert compute_thread_count(3) == 3
    assert compute_thread_count(0) == available_cpus() >= 1
    with pytest.raises(ValueError, match="--compute-threads"):
        Settings(compute_threads=-1).validate()


def test_the_engine_thread_runs_with_the_configured_thread_count(engine: Engine) -> None:
    caller = torch.get_num_threads()
    seen = engine.run_on_engine_thread(
        lambda: (threading.current_thread().name, torch.get_num_threads())
    )
    assert seen == ("engine-loop", 1)
    assert torch.get_num_threads() == caller  # per thread: the caller's setting is its own


def test_work_on_the_engine_thread_reports_its_errors_and_the_engine_keeps_going(
    engine: Engine,
) -> None:
    def fail() -> None:
        raise RuntimeError("bad task")

    with pytest.raises(RuntimeError, match="bad task"):
        engine.run_on_engine_thread(fail)
    assert engine.run_on_engine_thread(lambda: 41 + 1) == 42


def test_no_work_is_taken_after_shutdown(tiny_llama: ResolvedModel) -> None:
    engine = Engine(
        load_base_model(tiny_llama, "nf4", "cpu"),
        load_tokenizer(tiny_llama),
        Settings(max_batch_size=2),
        tiny_llama,
        lora_kernel="eager",
    )
    engine.shutdown()
    with pytest.raises(Unavailable):
        engine.run_on_engine_thread(lambda: None)


def test_compute_threads_survive_a_helper_setting_one_before_the_first_op() -> None:
    """The engine thread sets its count, a helper thread then sets 1 (the adapter loader
    does at start), and only then does the engine run its first op: it keeps its count."""
    counted = threading.Event()
    helper_done = threading.Event()
    seen: list[int] = []

    def engine_thread() -> None:
        use_compute_threads(2)
        counted.set()
        helper_done.wait(10)
        torch.ones(100_000).add_(1)  # this thread's first op
        seen.append(torch.get_num_threads())

    def helper_thread() -> None:
        counted.wait(10)
        use_one_thread()
        helper_done.set()

    threads = [threading.Thread(target=engine_thread), threading.Thread(target=helper_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [2]
