"""Choosing the next token for every row of a batch, each with its own settings.

Greedy rows (the common case in serving tests and evals) are one vectorised argmax;
only rows that sample pay for sorting, and each of them draws from its own seeded
generator so that a request's output does not depend on what it was batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.server.constraints.masks import MaskFiller, RowConstraint, apply_masks
from loramux.server.requests import SamplingParams


class RowSampler:
    """Per-request sampling state: its generator and the tokens it has seen.

    `ending`: the token ids that would end the output (EOS, stop_token_ids), held back
    until `min_tokens` tokens were generated, as vLLM does. `constraint`: the request's
    grammar state (structured output), whose mask applies after penalties and logit_bias
    and before temperature, top-k/top-p and the draw.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        ending: frozenset[int] = frozenset(),
        constraint: RowConstraint | None = None,
    ) -> None:
        self.params = params
        self.constraint = constraint
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device="cpu")
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.seen: set[int] = set(prompt_token_ids) if params.repetition_penalty != 1.0 else set()
        self.counts: dict[int, int] = {}  # generated tokens, for presence/frequency penalties
        self.generated = 0
        self.ending = sorted(ending)
        self.adjusts = bool(
            params.repetition_penalty != 1.0
            or params.presence_penalty
            or params.frequency_penalty
            or params.logit_bias
            or (params.min_tokens and self.ending)
        )

    def observe(self, token_id: int) -> None:
        self.generated += 1
        if self.constraint is not None:
            self.constraint.accept(token_id)
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token_id)
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts[token_id] = self.counts.get(token_id, 0) + 1

    def adjust(self, row: torch.Tensor) -> None:
        """[vocab] logits, in place: repetition, presence and frequency penalties, logit_bias,
        and the ending tokens masked while fewer than min_tokens were generated."""
        params = self.params
        if params.repetition_penalty != 1.0:
            _penalise(row, self.seen, params.repetition_penalty)
        if self.counts and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.long, device=row.device)
            counts = torch.tensor(list(self.counts.values()), dtype=row.dtype, device=row.device)
            row.index_add_(0, ids, -(counts * params.frequency_penalty + params.presence_penalty))
        vocab = row.shape[0]
        for token, bias in params.logit_bias:
            if token < vocab:
                row[token] += bias
        if self.generated < params.min_tokens and self.ending:
            ids = torch.tensor([t for t in self.ending if t < vocab], dtype=torch.long)
            row.index_fill_(0, ids.to(row.device), float("-inf"))


def _penalise(row: torch.Tensor, seen: set[int], penalty: float) -> None:
    if not seen:
        return
    ids = torch.tensor(sorted(seen), dtype=torch.long, device=row.device)
    picked = row.index_select(0, ids)
    row.index_copy_(0, ids, torch.where(picked > 0, picked / penalty, picked * penalty))


def filtered_logits(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[vocab] logits with a finite max -> [vocab] logits after temperature, top-k, top-p.

    The same distribution as transformers' TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper applied in that order (tests/test_engine_requests.py compares them):
    top-p keeps the smallest set of most likely tokens whose mass reaches `top_p`.
    """
    # Relative to the best logit before dividing: a tiny temperature then tends to greedy
    # instead of overflowing to inf - inf = NaN.
    logits = (row - row.max()) / params.temperature
    if params.top_k and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # the mass before it already suffices
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def _sample_row(row: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    # NaN logits (a broken adapter) never reach torch.multinomial, whose error would fail
    # every request in the batch.
    row = torch.nan_to_num(row, nan=float("-inf"), posinf=torch.finfo(row.dtype).max)
    if not torch.isfinite(row.max()):  # nothing but NaN and -inf: no distribution to draw from
        return int(row.argmax())
    probs = torch.softmax(filtered_logits(row, params), dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_next_tokens(
    logits: torch.Tensor, samplers: Sequence[RowSampler], masks: MaskFiller | None = None
) -> list[int]:
    """logits [rows, vocab] float32 -> one token id per row. `masks`: the engine's mask
    filler, which counts the time the constrained rows' masks take."""
    for i, sampler in enumerate(samplers):
        if sampler.adjusts:
            sampler.adjust(logits[i])
    if any(sampler.constraint is not None for sampler in samplers):
        apply_masks(logits, [sampler.constraint for sampler in samplers], masks)
    tokens = logits.argmax(dim=-1).tolist()
    for i, sampler in enumerate(samplers):
        if sampler.generator is not None:
            tokens[i] = _sample_row(logits[i], sampler.params, sampler.generator)
    for token, sampler in zip(tokens, samplers, strict=True):
        sampler.observe(token)
    return tokens
