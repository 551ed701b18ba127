"""Per-row grammar state and the step's token masks.

Each constrained row has a matcher (where it is in its grammar); before a step's tokens are
chosen, every constrained row's allowed tokens are written into its bitmask and applied to
that row's logits (disallowed tokens to -inf), after penalties and logit_bias and before
temperature, top-k/top-p and the draw, so sampling only ever picks an allowed token. Rows
without a constraint are not touched and cost nothing.

A row's allowed tokens depend only on the tokens it has accepted, all known before the
step's forward pass: `MaskFiller.start` fills the bitmasks of the rows that will sample
this step on a helper thread while the engine thread runs the forward pass (xgrammar's
calls go through tvm-ffi, which releases the GIL), and `apply_masks` waits for that fill
before it applies the masks. The engine thread never touches a matcher meanwhile: it only
accepts tokens after sampling, and the next fill starts after that. A row the fill did not
reach (not started, or the overlap is off) is filled at `apply_masks`, on the engine
thread. A fill that fails fails that row only (`RowConstraint.error`; the engine ends that
request with an error), not the batch.

The model's logits may be wider than the tokenizer's vocabulary (padded embeddings): the
matcher's vocabulary is the logits width, and ids the tokenizer lacks are never allowed.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import xgrammar as xgr

MASK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class RowConstraint:
    """One request's position in its grammar, and its next token's bitmask."""

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.rejected = False  # a token the grammar did not allow was chosen (a bug)
        self.error: str | None = None  # filling its mask failed: the request ends with it
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab / 32)] int32
        self._filled = False  # _bitmask holds the mask for the next token
        # kept here, updated at accept, not asked of the matcher at every check: each
        # xgrammar call releases and retakes the GIL, which other threads may hold
        self._terminated = False
        self._filling: concurrent.futures.Future[None] | None = None  # a helper's fill of it

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        """Write the allowed next tokens into bitmask[index] (bitmask [rows, words] int32)."""
        self._matcher.fill_next_token_bitmask(bitmask, index)

    def _fill_own(self) -> None:
        """Fill this row's own bitmask unless done; a failure is kept in `error`."""
        if self._filled or self.error is not None or self.terminated:
            return
        try:
            self.fill(self._bitmask, 0)
        except Exception as exc:  # a failure here is this request's alone
            self.error = f"filling its token mask failed: {type(exc).__name__}: {exc}"[:300]
        else:
            self._filled = True

    def next_mask(self) -> torch.Tensor | None:
        """[1, words] int32: the allowed next tokens, after waiting for a fill a helper
        thread started; filled here if none did; None when filling it failed."""
        if self._filling is not None:
            self._filling.result()
            self._filling = None
        self._fill_own()
        return self._bitmask if self.error is None else None

    def accept(self, token_id: int) -> None:
        self._filled = False
        if self.error is not None:
            return
        if self._terminated or not self._matcher.accept_token(token_id):
            self.rejected = True
        self._terminated = bool(self._matcher.is_terminated())

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end (a stop token) was accepted."""
        return self._terminated


@dataclass
class MaskStats:
    """Cumulative histograms for the metrics, read at scrape time: per step with
    constrained rows, the seconds the helper spent filling its masks (`fill`) and the
    seconds the engine thread spent on them at sampling (`sampling`: waiting for the fill,
    filling rows the helper did not, applying). `*_buckets[i]`: steps <= MASK_BUCKETS[i]."""

    fills: int = 0
    fill_seconds_sum: float = 0.0
    fill_buckets: list[int] = field(default_factory=lambda: [0] * len(MASK_BUCKETS))
    samplings: int = 0
    sampling_seconds_sum: float = 0.0
    sampling_buckets: list[int] = field(default_factory=lambda: [0] * len(MASK_BUCKETS))
    rows_ahead: int = 0  # row masks the helper filled during the forward pass
    rows_at_sampling: int = 0  # row masks filled on the engine thread at sampling

    def copy(self) -> MaskStats:
        return MaskStats(
            self.fills,
            self.fill_seconds_sum,
            list(self.fill_buckets),
            self.samplings,
            self.sampling_seconds_sum,
            list(self.sampling_buckets),
            self.rows_ahead,
            self.rows_at_sampling,
        )


def _count(buckets: list[int], seconds: float) -> None:
    for i, bound in enumerate(MASK_BUCKETS):
        if seconds <= bound:
            buckets[i] += 1


class MaskFiller:
    """Fills the next step's constrained rows' bitmasks on one helper thread, and counts
    the time masks take per step. `overlap` False: every mask is filled at sampling, on
    the engine thread (the serial baseline bench/structured.py compares with)."""

    def __init__(self, *, overlap: bool = True) -> None:
        self.overlap = overlap
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "loramux-masks")
        self._lock = threading.Lock()
        self._stats = MaskStats()

    def start(self, rows: Sequence[RowConstraint]) -> None:
        """Begin filling `rows`' masks (the rows that sample this step), from the engine
        thread just before the forward pass; `apply_masks` waits for it."""
        todo = [row for row in rows if row._filling is None and not row.terminated]
        if not self.overlap or not todo:
            return
        future = self._pool.submit(self._fill, todo)
        for row in todo:
            row._filling = future

    def _fill(self, rows: list[RowConstraint]) -> None:
        started = time.perf_counter()
        for row in rows:
            row._fill_own()
        self.record_fill(time.perf_counter() - started, len(rows), ahead=True)

    def record_fill(self, seconds: float, rows: int, *, ahead: bool) -> None:
        with self._lock:
            if ahead:
                self._stats.rows_ahead += rows
            else:
                self._stats.rows_at_sampling += rows
            self._stats.fills += 1
            self._stats.fill_seconds_sum += seconds
            _count(self._stats.fill_buckets, seconds)

    def record_sampling(self, seconds: float) -> None:
        with self._lock:
            self._stats.samplings += 1
            self._stats.sampling_seconds_sum += seconds
            _count(self._stats.sampling_buckets, seconds)

    def snapshot(self) -> MaskStats:
        with self._lock:
            return self._stats.copy()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def apply_masks(
    logits: torch.Tensor,
    rows: Sequence[RowConstraint | None],
    filler: MaskFiller | None = None,
) -> None:
    """logits [rows, width], in place: each constrained row keeps only its allowed tokens.

    The bitmask covers the matchers' vocabulary (the model's vocab_size); logits wider than
    it (ids no tokenizer or grammar knows) are disallowed outright in constrained rows.
    A row whose mask could not be filled (`error` set) is left as it is: the engine ends
    that request with its error instead of using the token. `filler`, when given, counts
    the seconds this took (and the helper's fill, for rows it did not fill ahead)."""
    started = time.perf_counter()
    filling, filled = 0.0, 0  # seconds spent here filling rows no helper filled ahead
    indices: list[int] = []
    masks: list[torch.Tensor] = []  # each [1, words] int32
    for i, row in enumerate(rows):
        if row is None or row.terminated:
            continue
        ahead = row._filling is not None or row._filled
        t = time.perf_counter()
        mask = row.next_mask()
        if not ahead:
            filling += time.perf_counter() - t
            filled += 1
        if mask is not None:
            indices.append(i)
            masks.append(mask)
    if indices:
        vocab = rows[indices[0]].vocab_size  # type: ignore[union-attr]
        width = logits.shape[-1]
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)  # [rows, words] int32
        bitmask[indices] = torch.cat(masks)
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(
            logits, bitmask, vocab_size=min(vocab, width), indices=indices
        )
        if width > vocab:
            logits[indices, vocab:] = float("-inf")
    if filler is not None:
        filler.record_sampling(time.perf_counter() - started)
        if filled:
            filler.record_fill(filling, filled, ahead=False)
