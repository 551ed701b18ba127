"""The engine's attention in a mixed pass (attention.py, kv_cache.GroupedKV), against
transformers' own SDPA attention on the same keys and values."""

from __future__ import annotations

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
    decode_lengths = [50, 120, 75]
    length = context + chunk
    keys = [torch.randn(1, KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16) for n in decode_lengths]
    keys.append(torch.randn(1, KV_HEADS, length, HEAD_DIM, dtype=torch.bfloat16))
    values = [torch.randn_like(k) for k in keys]
    tokens = len(decode_lengths) + chunk
    query = torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16)
    # the decode group: rows padded to the longest, masked past their own length
    longest = max(decode_lengths)
    padded = [torch.nn.functional.pad(k, (0, 0, 0, longest - k.shape[2])) for k in keys[:3]]
    padded_v = [torch.nn.functional.pad(v, (0, 0, 0, longest - v.shape[2])) for v in values[:3]]
    columns = torch.arange(longest)
    decode_mask = _additive(columns[None, :] < torch.tensor(decode_lengths)[:, None])
    chunk_mask = _additive(torch.arange(length)[None, :] <= torch.arange(context, length)[:, None])
    groups = [
        SegmentGroup(slice(0, 3), 3, torch.zeros(3, 1), longest, decode_mask[:, None, None]),
        SegmentGroup(slice(3, tokens), 1, torch.zeros(1, 1), length, chunk_mask[None, None]),
    ]
    grouped_k = GroupedKV(groups, [torch.cat(padded), keys[3]])
    grouped_v = GroupedKV(groups, [torch.cat(padded_v), values[3]])
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
    gemms = chunk <= EAGER_MAX_CHUNK and length >= EAGER_MIN_CONTEXT
    tolerance = 2e-2 if gemms else 0.0
    torch.testing.assert_close(out[0, 3:], expected[0], atol=tolerance, rtol=tolerance)
