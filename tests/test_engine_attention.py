"""The engine's grouped attention against transformers' own SDPA attention, bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from loramux.server.attention import grouped_attention_forward


def paged_mask(rows: int, length: int, kv_length: int, lengths: list[int]) -> torch.Tensor:
    """The runner's additive mask: row i's T new tokens end its `lengths[i]` cached ones."""
    columns = torch.arange(kv_length)
    masks = []
    for end in lengths:
        positions = end - length + torch.arange(length)
        allowed = (columns[None, :] <= positions[:, None]) & (columns[None, :] < end)
        masks.append(allowed)
    allowed = torch.stack(masks)[:, None]  # [rows, 1, T, kv_length]
    dtype = torch.bfloat16
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "length", "lengths"),
    [(9, 3, 1, [5, 40, 17]), (9, 3, 16, [16, 300, 64]), (4, 4, 7, [7, 20]), (8, 2, 32, [900])],
)
def test_grouped_attention_equals_transformers_sdpa(
    heads: int, kv_heads: int, length: int, lengths: list[int]
) -> None:
    torch.manual_seed(0)
    rows, head_dim, kv_length = len(lengths), 64, max(lengths)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    query = torch.randn(rows, heads, length, head_dim, dtype=torch.bfloat16)
    key = torch.randn(rows, kv_heads, kv_length, head_dim, dtype=torch.bfloat16)
    value = torch.randn(rows, kv_heads, kv_length, head_dim, dtype=torch.bfloat16)
    mask = paged_mask(rows, length, kv_length, lengths)
    scaling = head_dim**-0.5
    got, _ = grouped_attention_forward(module, query, key, value, mask, scaling=scaling)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)  # type: ignore[arg-type]
    assert got.shape == want.shape == (rows, length, heads, head_dim)
    # The same kernel on the same numbers: the engine's tokens stay PEFT's token for token.
    assert torch.equal(got, want)
    # and it is attention: the eager reference agrees to bf16 rounding
    eager, _ = eager_attention_forward(
        module,  # type: ignore[arg-type]
        query.float(),
        key.float(),
        value.float(),
        mask.float(),
        scaling=scaling,
    )
    # (SDPA rounds its probabilities to bf16: errors of a few bf16 ulps of the output)
    torch.testing.assert_close(got.float(), eager, rtol=2**-7, atol=8e-3)
