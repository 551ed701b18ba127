"""Compiling constraints against the engine's tokenizer: off the engine thread, bounded in
time and memory, cached by digest.

Compiling a JSON schema or a grammar walks the whole vocabulary (tens of milliseconds to
seconds); a decode step is a few milliseconds. So compiles run in a small pool of their own,
called from the thread that admits a request (the HTTP bridge's or a gRPC handler's), never
from the engine's loop. xgrammar cannot be interrupted, so a constraint is first compiled
in a worker process (`isolation`) that is killed when it takes longer than `timeout`
seconds or outgrows `memory_bytes`: that request gets a 400 naming the field, and no thread
or process of the server is left working on it. Only a constraint that compiled there is
compiled again here, into the cache.

One cache per tokenizer (one per engine): the compiled grammar depends on the vocabulary.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import xgrammar as xgr

from loramux.core.errors import InvalidArgument
from loramux.server.constraints.isolation import CompileWorkers
from loramux.server.constraints.spec import ConstraintKind, ConstraintSpec

MAX_WHITESPACE = (
    8  # whitespace characters in a row between JSON tokens ("\n" + 2-space indent to depth 3)
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loramux.server.constraints.masks import RowConstraint


@dataclass(frozen=True)
class CompiledConstraint:
    """A spec compiled for one tokenizer; `matcher()` gives each request its own state."""

    spec: ConstraintSpec
    grammar: xgr.CompiledGrammar
    vocab_size: int  # the model's logits width the bitmask covers

    def matcher(self) -> RowConstraint:
        from loramux.server.constraints.masks import RowConstraint

        return RowConstraint(xgr.GrammarMatcher(self.grammar), self.vocab_size)


COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)


@dataclass
class GrammarStats:
    """Counters for the metrics, read at scrape time (the cache never touches
    prometheus_client): constrained requests by kind, cache hits, and a cumulative
    histogram of compile seconds (`compile_buckets[i]`: compiles <= COMPILE_BUCKETS[i])."""

    requests: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    compiles: int = 0
    compile_seconds_sum: float = 0.0
    compile_buckets: list[int] = field(default_factory=lambda: [0] * len(COMPILE_BUCKETS))

    def compiled(self, seconds: float) -> None:
        self.compiles += 1
        self.compile_seconds_sum += seconds
        for i, bound in enumerate(COMPILE_BUCKETS):
            if seconds <= bound:
                self.compile_buckets[i] += 1


class GrammarCache:
    """Compiled grammars of one tokenizer by the digest of their spec, least recently used
    dropped beyond `capacity`; concurrent requests for one spec share one compile."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        *,
        capacity: int,
        timeout: float,
        threads: int,
        memory_bytes: int,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self.capacity = capacity
        self.timeout = timeout
        self.memory_bytes = memory_bytes
        self._threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "loramux-grammar")
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._workers: CompileWorkers | None = None
        self._cache: OrderedDict[str, CompiledConstraint] = OrderedDict()
        self._pending: dict[str, concurrent.futures.Future[CompiledConstraint]] = {}
        self.stats = GrammarStats()

    def compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        """The compiled grammar of `spec`, from the cache or compiled now: the caller waits
        for the worker's try (at most `timeout` seconds, plus a worker's start when none is
        ready) and for the compile here, the same work again. Raises InvalidArgument naming
        `spec.field`."""
        digest = spec.digest
        with self._lock:
            kind = spec.kind.value
            self.stats.requests[kind] = self.stats.requests.get(kind, 0) + 1
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
                self.stats.cache_hits += 1
                return hit
            future = self._pending.get(digest)
            if future is None:
                future = self._pool.submit(self._compile, spec)
                self._pending[digest] = future
                future.add_done_callback(lambda _: self._done(digest))
        try:
            return future.result()
        except _Refused as refused:  # one message, each waiter's own field
            raise InvalidArgument(spec.field, str(refused)) from None

    def _done(self, digest: str) -> None:
        with self._lock:
            future = self._pending.pop(digest, None)
            if future is None or future.exception() is not None:
                return
            self._cache[digest] = future.result()
            self._cache.move_to_end(digest)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)

    def _compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        started = time.perf_counter()
        compiler, workers = self._grammar_compiler()
        refused = workers.check(spec.kind.value, spec.source, self.timeout)
        if refused is not None:
            raise _Refused(refused)
        try:
            grammar = compile_spec(compiler, spec)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse errors
            raise _Refused(f"cannot be compiled: {first_line(exc)}") from None
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats.compiled(seconds)
        return CompiledConstraint(spec, grammar, self.vocab_size)

    def _grammar_compiler(self) -> tuple[xgr.GrammarCompiler, CompileWorkers]:
        """Built on first use: reading the vocabulary (and starting a worker process) takes
        a moment a server without constrained requests never pays."""
        with self._lock:
            if self._compiler is None or self._workers is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self.vocab_size,
                    stop_token_ids=self._stop_token_ids,
                )
                # xgrammar's own cache is unbounded by default; ours is bounded and counted
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
                self._workers = CompileWorkers(
                    info.serialize_json(), workers=self._threads, memory_bytes=self.memory_bytes
                )
            return self._compiler, self._workers

    def compile_here(self, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        """`spec` compiled in this process without the worker's try, uncached: what a
        compile cost before the workers (bench/structured.py compares)."""
        return compile_spec(self._grammar_compiler()[0], spec)

    def busy(self) -> tuple[int, list[int]]:
        """Compiles in flight, and the worker processes alive (for tests)."""
        with self._lock:  # a finished compile leaves _pending in its done-callback, a bit later
            pending = sum(1 for future in self._pending.values() if not future.done())
            workers = self._workers
        return pending, workers.pids() if workers is not None else []

    def snapshot(self) -> GrammarStats:
        """A consistent copy of the counters (for the metrics collector)."""
        with self._lock:
            stats = self.stats
            return GrammarStats(
                dict(stats.requests),
                stats.cache_hits,
                stats.compiles,
                stats.compile_seconds_sum,
                list(stats.compile_buckets),
            )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers = self._workers
        if workers is not None:
            workers.close()


class _Refused(Exception):
    """A compile refused, with the reason; each waiter raises it with its own field."""


def compile_spec(compiler: xgr.GrammarCompiler, spec: ConstraintSpec) -> xgr.CompiledGrammar:
    # Whitespace between tokens as the model likes it (a mask that forced compact JSON
    # would change outputs that were already valid), but at most MAX_WHITESPACE in a row:
    # a small model otherwise spends its max_tokens on spaces inside an open object.
    if spec.kind is ConstraintKind.JSON_OBJECT:
        return compiler.compile_json_schema(
            '{"type":"object"}',
            any_whitespace=True,
            strict_mode=False,
            max_whitespace_cnt=MAX_WHITESPACE,
        )
    if spec.kind is ConstraintKind.JSON_SCHEMA:
        # strict_mode: no properties or items beyond what the schema names, so every
        # output is valid against the schema whatever its `additionalProperties` default
        return compiler.compile_json_schema(
            spec.source, any_whitespace=True, strict_mode=True, max_whitespace_cnt=MAX_WHITESPACE
        )
    if spec.kind is ConstraintKind.REGEX:
        return compiler.compile_regex(spec.source)
    if spec.kind is ConstraintKind.CHOICE:
        return compiler.compile_grammar(_choice_grammar(spec.choices()))
    if spec.kind is ConstraintKind.TOOL_CALLS:
        return compiler.compile_structural_tag(spec.source)
    return compiler.compile_grammar(spec.source)


def _choice_grammar(choices: list[str]) -> str:
    """EBNF whose root is exactly one of the choices (each a quoted literal)."""
    return "root ::= " + " | ".join(_literal(c) for c in choices)


def _literal(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char.isprintable() and char != "\x7f":
            escaped.append(char)
        else:
            escaped.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return '"' + "".join(escaped) + '"'


def first_line(exc: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    lines = str(exc).strip().splitlines()
    text = _LOCATION.sub("", lines[0]) if lines else type(exc).__name__
    return text[:300]


_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
