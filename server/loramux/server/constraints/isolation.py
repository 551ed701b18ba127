"""Trying a constraint's compile in a worker process first, bounded in time and memory.

xgrammar cannot be interrupted: a compile that runs long holds its thread until it returns,
and its memory is the server's. So every compile is tried first in a worker process of its
own (`python -m loramux.server.constraints.isolation`), whose address space is limited,
before each compile, to what it has mapped then plus `memory_bytes` (RLIMIT_AS): a compile
that outgrows that fails there (or the worker dies), and one that outruns `timeout` is
killed (SIGKILL), its memory returned to the system. Only a constraint that compiled there
is compiled again in the server (the same work on the same inputs, so about the same time
and memory, both known to be within bounds now); the grammar is not shipped back, because
xgrammar's serialized form is ~1.5 MB for a small schema and writing and reading it costs
more than compiling it again (docs/performance.md).

A worker serves one compile at a time and lives on; one that was killed or died is
replaced in the background, so the next constraint does not pay its start (importing
xgrammar and reading the tokenizer's vocabulary, seconds).

Messages, one JSON document per line: the parent sends {"tokenizer_info": ...,
"memory_bytes": N} once, the worker answers {"ready": true}; then per compile the parent
sends {"kind", "source"} and the worker answers {"error": null | "message"}.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import queue
import resource
import selectors
import subprocess
import sys
import threading
import time
from typing import IO, Any

STARTUP_SECONDS = 120.0  # longest a worker may take to start (import xgrammar, read vocab)


class CompileRefused(Exception):
    """The worker said no: the constraint does not compile, or overran a bound."""


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, tokenizer_info: str, memory_bytes: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loramux.server.constraints.isolation"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin: IO[str] = self.process.stdin
        self._stdout: IO[str] = self.process.stdout
        self._send({"tokenizer_info": tokenizer_info, "memory_bytes": memory_bytes})
        answer = self._receive(STARTUP_SECONDS)
        if answer is None or not answer.get("ready"):
            self.kill()
            raise RuntimeError("the grammar compile worker did not start")

    def _send(self, message: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(message) + "\n")
        self._stdin.flush()

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """The next answer, or None when none came within `timeout` or the worker died."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return None
        line = self._stdout.readline()
        return json.loads(line) if line else None

    def check(self, kind: str, source: str, timeout: float) -> str | None:
        """None when `source` compiled within `timeout`, else why not (the worker is then
        killed when it overran or died: `alive` says)."""
        started = time.monotonic()
        try:
            self._send({"kind": kind, "source": source})
        except (BrokenPipeError, OSError):
            self.kill()
            return "could not be compiled: the compile worker died"
        answer = self._receive(timeout)
        if answer is None:
            overran = time.monotonic() - started >= timeout
            self.kill()
            if overran:
                return f"took longer than {timeout:g} s to compile"
            return "could not be compiled within the server's memory bound for a compile"
        error = answer.get("error")
        return str(error) if error is not None else None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self._stdin, self._stdout):
            with contextlib.suppress(OSError):
                pipe.close()


class CompileWorkers:
    """Up to `workers` worker processes, each trying one compile at a time."""

    def __init__(self, tokenizer_info: str, *, workers: int, memory_bytes: int) -> None:
        self._tokenizer_info = tokenizer_info
        self.memory_bytes = memory_bytes
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._started = 0  # workers alive or starting
        self._limit = workers
        self._closed = False
        self.busy: set[_Worker] = set()  # trying a compile now

    def check(self, kind: str, source: str, timeout: float) -> str | None:
        """None when the constraint compiles within `timeout` and the memory bound in a
        worker process, else the reason it was refused (the worker that overran is gone)."""
        worker = self._take()
        with self._lock:
            self.busy.add(worker)
        try:
            error = worker.check(kind, source, timeout)
        finally:
            with self._lock:
                self.busy.discard(worker)
        self._give_back(worker)
        return error

    def _take(self) -> _Worker:
        with self._lock:
            start = self._idle.empty() and self._started < self._limit
            if start:
                self._started += 1
        if start:
            try:
                return _Worker(self._tokenizer_info, self.memory_bytes)
            except Exception:
                with self._lock:
                    self._started -= 1
                raise
        return self._idle.get(timeout=STARTUP_SECONDS)

    def _give_back(self, worker: _Worker) -> None:
        if worker.alive and not self._closed:
            self._idle.put(worker)
            return
        worker.kill()
        with self._lock:
            self._started -= 1
        if not self._closed:  # its replacement starts now, not in the next request
            threading.Thread(target=self._replace, name="loramux-grammar-worker").start()

    def _replace(self) -> None:
        with self._lock:
            if self._started >= self._limit or self._closed:
                return
            self._started += 1
        try:
            worker = _Worker(self._tokenizer_info, self.memory_bytes)
        except Exception:
            with self._lock:
                self._started -= 1
            return
        self._give_back(worker)

    def pids(self) -> list[int]:
        """The worker processes alive and idle, and busy (for tests)."""
        with self._lock:
            busy = [w.process.pid for w in self.busy]
        return [w.process.pid for w in list(self._idle.queue)] + busy

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break
        with self._lock:
            busy = list(self.busy)
        for worker in busy:
            worker.kill()


def _limit_memory(extra: int) -> None:
    """Cap this process's address space at what it maps now plus `extra` bytes, before each
    compile (a soft limit: the next compile's is measured afresh), after handing freed heap
    back so that it does not count as room for the compile. (No gc.collect here: with torch
    imported one takes ~0.5 s; the worker collected and froze its objects when it started.)"""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[0])
    now = pages * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (now + extra, resource.RLIM_INFINITY))


def _serve() -> None:
    """The worker's loop (stdin/stdout)."""
    import xgrammar as xgr

    from loramux.server.constraints.compiler import compile_spec, first_line
    from loramux.server.constraints.spec import ConstraintKind, ConstraintSpec

    setup = json.loads(sys.stdin.readline())
    memory_bytes = int(setup["memory_bytes"])
    info = xgr.TokenizerInfo.deserialize_json(setup.pop("tokenizer_info"))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiler.compile_regex("a")  # what a first compile sets up once is not the spec's
    del setup
    gc.collect()
    gc.freeze()  # what is alive now is never scanned again
    limited = sys.platform.startswith("linux")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        spec = ConstraintSpec(ConstraintKind(request["kind"]), request["source"], "")
        del line, request
        error: str | None = None
        try:
            if limited:
                _limit_memory(memory_bytes)
            compile_spec(compiler, spec)
        except MemoryError:
            error = "could not be compiled within the server's memory bound for a compile"
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse errors
            message = first_line(exc)
            if "bad_alloc" in message or "memory" in message.lower():
                error = "could not be compiled within the server's memory bound for a compile"
            else:
                error = f"cannot be compiled: {message}"
        print(json.dumps({"error": error}), flush=True)


if __name__ == "__main__":
    _serve()
