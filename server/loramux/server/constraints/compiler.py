"""Compiling constraints against the engine's tokenizer: off the engine thread, bounded in
time, cached by digest.

Compiling a JSON schema or a grammar walks the whole vocabulary (tens of milliseconds to
seconds); a decode step is a few milliseconds. So compiles run in a small pool of their own,
called from the thread that admits a request (the HTTP bridge's or a gRPC handler's), never
from the engine's loop; the caller waits at most `timeout` seconds and then gets a 400
naming the field. A compile that overran keeps its pool thread until xgrammar returns (it
cannot be interrupted), which is why the pool is small and separate: the engine and
requests without constraints never wait on it.

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
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self.capacity = capacity
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "loramux-grammar")
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[str, CompiledConstraint] = OrderedDict()
        self._pending: dict[str, concurrent.futures.Future[CompiledConstraint]] = {}
        self.stats = GrammarStats()

    def compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        """The compiled grammar of `spec`, from the cache or compiled now (blocks the caller
        up to `timeout` seconds). Raises InvalidArgument naming `spec.field`."""
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
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise InvalidArgument(
                spec.field, f"took longer than {self.timeout:g} s to compile"
            ) from None

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
        compiler = self._grammar_compiler()
        try:
            grammar = _compile(compiler, spec)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse errors
            raise InvalidArgument(spec.field, f"cannot be compiled: {_first_line(exc)}") from None
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats.compiled(seconds)
        return CompiledConstraint(spec, grammar, self.vocab_size)

    def _grammar_compiler(self) -> xgr.GrammarCompiler:
        """Built on first use: reading the vocabulary takes a moment a server without
        constrained requests never pays."""
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self.vocab_size,
                    stop_token_ids=self._stop_token_ids,
                )
                # xgrammar's own cache is unbounded by default; ours is bounded and counted
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

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


def _compile(compiler: xgr.GrammarCompiler, spec: ConstraintSpec) -> xgr.CompiledGrammar:
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


def _first_line(exc: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    lines = str(exc).strip().splitlines()
    text = _LOCATION.sub("", lines[0]) if lines else type(exc).__name__
    return text[:300]


_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
