"""The engine's attention in a mixed pass (attention.py, kv_cache.GroupedKV), against
transformers' own SDPA attention on the same keys and values."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loramux.server.attention import EAGER_MAX_CHUNK, EAGER_MIN_CONTEXT, paged_attention_forward
from loramux.server.kv_cache import GroupedKV, SegmentGroup

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=torch.bfloat16)
    return mask.masked_fill_(~allowed, torch.finfo(torch.bfloat16).min)


@dataclass
class _MixedPass:
    """Three decoding rows (50, 120, 75 tokens) and one chunk of `chunk` tokens after
    `context` cached ones, flattened as the mixed pass does: its inputs and per-row parts."""

    query: torch.Tensor  # [1, heads, tokens, head_dim]
    keys: list[torch.Tensor]  # per row [1, kv_heads, its length, head_dim]; the chunk's last
    values: list[torch.Tensor]
    padded: list[torch.Tensor]  # decoding rows' keys padded to the longest
    padded_v: list[torch.Tensor]
    decode_mask: torch.Tensor  # [3, longest] additive
    chunk_mask: torch.Tensor  # [chunk, context + chunk] additive
    grouped_k: GroupedKV
    grouped_v: GroupedKV


DECODE_LENGTHS = [50, 120, 75]


def _mixed_pass(context: int, chunk: int) -> _MixedPass:
    length = context + chunk
    keys = [torch.randn(1, KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16) for n in DECODE_LENGTHS]
    keys.append(torch.randn(1, KV_HEADS, length, HEAD_DIM, dtype=torch.bfloat16))
    values = [torch.randn_like(k) for k in keys]
    tokens = len(DECODE_LENGTHS) + chunk
    query = torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16)
    # the decode group: rows padded to the longest, masked past their own length
    longest = max(DECODE_LENGTHS)
    padded = [torch.nn.functional.pad(k, (0, 0, 0, longest - k.shape[2])) for k in keys[:3]]
    padded_v = [torch.nn.functional.pad(v, (0, 0, 0, longest - v.shape[2])) for v in values[:3]]
    columns = torch.arange(longest)
    decode_mask = _additive(columns[None, :] < torch.tensor(DECODE_LENGTHS)[:, None])
    chunk_mask = _additive(torch.arange(length)[None, :] <= torch.arange(context, length)[:, None])
    groups = [
        SegmentGroup(slice(0, 3), 3, torch.zeros(3, 1), longest, decode_mask[:, None, None]),
        SegmentGroup(slice(3, tokens), 1, torch.zeros(1, 1), length, chunk_mask[None, None]),
    ]
    grouped_k = GroupedKV(groups, [torch.cat(padded), keys[3]])
    grouped_v = GroupedKV(groups, [torch.cat(padded_v), values[3]])
    return _MixedPass(
        query, keys, values, padded, padded_v, decode_mask, chunk_mask, grouped_k, grouped_v
    )


@pytest.mark.parametrize(
    ("context", "chunk"),
    [(EAGER_MIN_CONTEXT, 4), (EAGER_MIN_CONTEXT + 100, EAGER_MAX_CHUNK), (300, 4), (200, 40)],
)
def test_mixed_pass_attention_equals_sdpa_per_row(context: int, chunk: int) -> None:
    """Three decoding rows and one chunk after `context` cached tokens, flattened as the
    mixed pass does: each decoding row's output is transformers' SDPA attention for that
    row as the decode pass runs it (padded, masked), bit for bit; the chunk's is SDPA's on
    its own keys and values within a bf16 rounding (the GEMM path for a short chunk over a
    long context; SDPA's path, bit for bit, otherwise)."""
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    mixed = _mixed_pass(context, chunk)
    decode_lengths, query, keys, values = DECODE_LENGTHS, mixed.query, mixed.keys, mixed.values
    padded, padded_v, decode_mask = mixed.padded, mixed.padded_v, mixed.decode_mask
    chunk_mask, grouped_k, grouped_v = mixed.chunk_mask, mixed.grouped_k, mixed.grouped_v
    tokens = len(decode_lengths) + chunk
    out, _ = paged_attention_forward(
        module, query, grouped_k, grouped_v, None, scaling=HEAD_DIM**-0.5
    )
    assert out.shape == (1, tokens, HEADS, HEAD_DIM)
    for row in range(len(decode_lengths)):  # as the decode pass: padded, masked, one row
        expected, _ = sdpa_attention_forward(
            module,
            query[:, :, row : row + 1],
            padded[row],
            padded_v[row],
            decode_mask[row][None, None, None],
            scaling=HEAD_DIM**-0.5,
        )
        torch.testing.assert_close(out[0, row], expected[0, 0], atol=0, rtol=0)
    expected, _ = sdpa_attention_forward(
        module,
        query[:, :, 3:],
        keys[3],
        values[3],
        chunk_mask[None, None],
        scaling=HEAD_DIM**-0.5,
    )
    gemms = chunk <= EAGER_MAX_CHUNK and context + chunk >= EAGER_MIN_CONTEXT
    tolerance = 2e-2 if gemms else 0.0
    torch.testing.assert_close(out[0, 3:], expected[0], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    ("softcap", "window", "sinks"),
    [(1.0, None, False), (None, 16, False), (1.0, 16, False), (None, 16, True), (None, None, True)],
)
def test_soft_capping_sinks_and_sliding_windows_equal_the_families_eager_attention(
    softcap: float | None, window: int | None, sinks: bool
) -> None:
    """Gemma 2's attention (logit soft-capping, sliding windows) and GPT-OSS's (attention
    sinks: one extra softmax column per head), which SDPA does not take:
    in a padded prefill pass and in a mixed pass (three decoding rows, one chunk), each
    row's output is transformers' own Gemma 2 eager attention on the row's keys and values
    under a mask built here from positions (column c allowed when p - window < c <= p),
    bit for bit (the same GEMMs, the capped scores masked, softmax in float32); with a
    window alone, transformers' SDPA attention (as Mistral's, StarCoder2's), bit for bit;
    with sinks, GPT-OSS's own eager attention, bit for bit."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
    from transformers.models.gpt_oss.modeling_gpt_oss import (
        eager_attention_forward as sinks_attention_forward,
    )

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    module.training = False
    module.sinks = torch.randn(HEADS, dtype=torch.bfloat16) if sinks else None
    scale = HEAD_DIM**-0.5

    def reference(
        query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: list[int]
    ) -> torch.Tensor:
        columns = torch.arange(keys.shape[2])
        at = torch.tensor(positions)[:, None]
        allowed = (columns[None, :] <= at) & (columns[None, :] < max(positions) + 1)
        if window is not None:
            allowed &= columns[None, :] > at - window
        mask = _additive(allowed)[None, None]
        if sinks:
            out, _ = sinks_attention_forward(module, query, keys, values, mask, scaling=scale)
        elif softcap is None:  # a window alone: transformers' SDPA attention, as Mistral's
            out, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=scale)
        else:
            out, _ = eager_attention_forward(
                module, query, keys, values, mask, scaling=scale, softcap=softcap
            )
        return out[0]  # [T, heads, head_dim]

    kwargs = {"softcap": softcap, "sliding_window": window, "s_aux": module.sinks}
    # a padded prefill pass: two rows of 40 and 25 tokens from position 0
    lengths = [40, 25]
    keys = torch.randn(2, KV_HEADS, 40, HEAD_DIM, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    query = torch.randn(2, HEADS, 40, HEAD_DIM, dtype=torch.bfloat16)
    columns = torch.arange(40)
    ends = torch.tensor(lengths)[:, None, None]
    allowed = (columns[None, None, :] <= columns[None, :, None]) & (columns[None, None, :] < ends)
    out, _ = paged_attention_forward(
        module, query, keys, values, _additive(allowed[:, None]), scaling=scale, **kwargs
    )
    for row, n in enumerate(lengths):
        # over the pass's padded width, the padding masked, as transformers pads a batch
        expected = reference(
            query[row : row + 1, :, :n], keys[row : row + 1], values[row : row + 1],
            list(range(n)),
        )  # fmt: skip
        torch.testing.assert_close(out[row, :n], expected, atol=0, rtol=0)

    # a mixed pass: decoding rows at positions 49, 119, 74, and a chunk of 20 after 30
    start, chunk = 30, 20
    mixed = _mixed_pass(start, chunk)
    query = mixed.query
    out, _ = paged_attention_forward(
        module, query, mixed.grouped_k, mixed.grouped_v, None, scaling=scale, **kwargs
    )
    for row, n in enumerate(DECODE_LENGTHS):
        expected = reference(
            query[:, :, row : row + 1], mixed.padded[row], mixed.padded_v[row], [n - 1]
        )
        torch.testing.assert_close(out[0, row], expected[0], atol=0, rtol=0)
    expected = reference(
        query[:, :, 3:], mixed.keys[3], mixed.values[3], list(range(start, start + chunk))
    )
    torch.testing.assert_close(out[0, 3:], expected, atol=0, rtol=0)
