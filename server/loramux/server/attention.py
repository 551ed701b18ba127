"""The engine's attention over the paged KV cache, chosen once per device.

Every engine pass attends under a 4-D additive mask ([rows, 1, T, kv_length], built by
the runner). With a mask, transformers' sdpa path copies each key/value head out to all
its query heads (`repeat_kv`, 3x the bytes on SmolLM2's 9 query / 3 KV heads) for any
pass longer than one token; a single decode token it already handles by stacking the
query heads of a KV head (`pack_gqa`). A prefill chunk next to decoding rows is a short
pass that, near the end of a long prompt, attends to thousands of tokens, so the copy is
most of its attention: a 16-token chunk at 6,000 tokens of context took 2.59 ms a layer
through repeat_kv + SDPA on this 2-core CPU.

`grouped_attention_forward` does for every pass what pack_gqa does for one token: the
query heads that share a KV head become extra query rows ([rows, kv_heads, groups x T,
head_dim]) and the mask is repeated to match, so keys and values are read in place. It
runs the same SDPA kernel on the same numbers row by row, so its output is bit-identical
to transformers' (tests/test_engine_attention.py); 16 tokens at 6,000 of context took
1.75 ms a layer (10 tokens: 1.33 against 2.19 ms; 64 tokens at 1,000: equal).

On CUDA the engine keeps transformers' SDPA (fused kernels); a paged-attention kernel can
take its place behind the same registration.
"""

from __future__ import annotations

from typing import Any

import torch

GROUPED_ATTENTION = "loramux_grouped"


def grouped_attention_forward(
    module: Any,
    query: torch.Tensor,  # [rows, heads, T, head_dim]
    key: torch.Tensor,  # [rows, kv_heads, kv_length, head_dim]
    value: torch.Tensor,  # [rows, kv_heads, kv_length, head_dim]
    attention_mask: torch.Tensor | None,  # [rows, 1, T, kv_length] additive
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # ([rows, T, heads, head_dim], no weights)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, length, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if attention_mask is None or groups == 1 or length == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    # Head h reads KV head h // groups (transformers' repeat_kv order).
    stacked = query.reshape(rows, kv_heads, groups * length, head_dim)
    mask = attention_mask[:, :, None, :, :kv_length].expand(rows, 1, groups, length, kv_length)
    out = torch.nn.functional.scaled_dot_product_attention(
        stacked,
        key,
        value,
        attn_mask=mask.reshape(rows, 1, groups * length, kv_length),
        dropout_p=dropout,
        scale=scaling,
    )  # [rows, kv_heads, groups * T, head_dim]
    out = out.view(rows, heads, length, head_dim)
    return out.transpose(1, 2).contiguous(), None


def engine_attention(device: torch.device) -> str | None:
    """The attention implementation the engine sets on its model (None: keep the model's).

    Registered with transformers on first use; the 4-D mask the runner passes is used as
    is (transformers builds no mask of its own for a 4-D one).
    """
    if device.type != "cpu":
        return None
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention_forward)
    return GROUPED_ATTENTION
