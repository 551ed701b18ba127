"""Per-row grammar state and the step's token masks.

Each constrained row has a matcher (where it is in its grammar); before a step's tokens are
chosen, every constrained row's allowed tokens are written into one bitmask and applied to
that row's logits (disallowed tokens to -inf), after penalties and logit_bias and before
temperature, top-k/top-p and the draw, so sampling only ever picks an allowed token. Rows
without a constraint are not touched and cost nothing.

The model's logits may be wider than the tokenizer's vocabulary (padded embeddings): the
matcher's vocabulary is the logits width, and ids the tokenizer lacks are never allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar as xgr


class RowConstraint:
    """One request's position in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.rejected = False  # a token the grammar did not allow was chosen (a bug)

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, index)

    def accept(self, token_id: int) -> None:
        if self.terminated or not self._matcher.accept_token(token_id):
            self.rejected = True

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end (a stop token) was accepted."""
        return bool(self._matcher.is_terminated())


def apply_masks(logits: torch.Tensor, rows: Sequence[RowConstraint | None]) -> None:
    """logits [rows, width], in place: each constrained row keeps only its allowed tokens.

    The bitmask covers the matchers' vocabulary (the model's vocab_size); logits wider than
    it (ids no tokenizer or grammar knows) are disallowed outright in constrained rows."""
    indices = [i for i, row in enumerate(rows) if row is not None and not row.terminated]
    if not indices:
        return
    vocab = next(row.vocab_size for row in rows if row is not None)
    width = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)
    for i in indices:
        row = rows[i]
        assert row is not None
        row.fill(bitmask, i)
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(vocab, width), indices=indices)
    if width > vocab:
        logits[indices, vocab:] = float("-inf")
