"""The engine's attention: transformers' SDPA, per segment group in a ragged pass.

A step that decodes some rows and prefills a chunk of another request's prompt runs as
one pass over the weights (runner.py, `ModelRunner.mixed`): its tokens are flattened into
one row, so every linear layer sees the decode tokens and the chunk's together. Only
attention needs to know whose token is whose. The paged KV cache hands it a `GroupedKV`
in such a pass (kv_cache.py), and `paged_attention_forward` attends once per group under
the group's mask: the decoding rows together through transformers' own SDPA attention,
exactly as the decode pass does, and each chunk alone with the query heads of a KV head
stacked (no copy of keys and values per head), by SDPA or, for a short chunk over a long
context, by two GEMMs (measured faster; the same math as transformers' eager attention,
within a bf16 rounding of SDPA's).

Why one pass: on this CPU a pass costs ~12 ms before its first token (every NF4 weight
dequantised) plus ~0.5 ms a token (SmolLM2, 2 cores: 1 token 12.7 ms, 31 tokens 26.9 ms,
63 tokens 42.2 ms, 95 tokens 57.6 ms), so a chunk in a pass of its own next to the
decode pass made every such step cost two passes (docs/performance.md, issue 12).

Rows the runner gave to a paged-attention kernel (paged_attention/: decoding rows, and
chunks over at least `KERNEL_MIN_CONTEXT` tokens) arrive ungathered (`PoolKV`, or a
`GroupedKV` group without keys) and are computed by one kernel call per layer, straight
from the block pool. Every other pass (all rows padded to one width) goes to transformers'
SDPA unchanged.
Registered with transformers once, under `ENGINE_ATTENTION`; the runner sets it on the
model it serves.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loramux.server.kv_cache import GroupedKV, KernelBatch, PoolKV

ENGINE_ATTENTION = "loramux_paged"
# Chunks of at most this many tokens over at least this much context attend by plain
# GEMMs, others by SDPA (see `_eager_attention` for the measurement). Below that context
# the gain is a fraction of a millisecond a step, and SDPA keeps a short prompt's chunk
# bit-identical to its prefill alone (the GEMMs round differently: on a random tiny model,
# where logits tie often, that flipped a soak test's first token).
EAGER_MAX_CHUNK = 16
EAGER_MIN_CONTEXT = 1024
# With a paged-attention kernel (paged_attention/), a chunk beside decoding rows over at
# least this much context is the kernel's; shorter ones take SDPA as a prefill pass does.
KERNEL_MIN_CONTEXT = EAGER_MIN_CONTEXT


def paged_attention_forward(
    module: Any,
    query: torch.Tensor,  # [rows, heads, T, head_dim]; ragged: [1, heads, tokens, head_dim]
    key: torch.Tensor | GroupedKV | PoolKV,  # [rows, kv_heads, kv_length, head_dim], or not
    value: torch.Tensor | GroupedKV | PoolKV,  # gathered: per group, or the pool itself
    attention_mask: torch.Tensor | None,  # [rows, 1, T, kv_length]; unused when ragged
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # ([rows, T, heads, head_dim], no weights)
    # Gemma 2's attention logit soft-capping, GPT-OSS's attention sinks and the sliding
    # windows of Mistral, Gemma 2/3, StarCoder2, GPT-OSS (per layer): computed here on the
    # torch path; both paged kernels take windows and soft-capping too (each layer's are
    # handed to them), neither takes sinks (paged_attention.choose_kernel does not pick a
    # kernel for a model whose variants it lacks).
    softcap: float | None = kwargs.pop("softcap", None)
    window: int | None = kwargs.pop("sliding_window", None)
    sinks: torch.Tensor | None = kwargs.pop("s_aux", None)  # [heads] GPT-OSS attention sinks
    eager = softcap is not None or sinks is not None  # SDPA takes neither
    if isinstance(key, PoolKV):  # decoding rows, every one by the kernel
        assert isinstance(value, PoolKV) and query.shape[2] == 1
        assert sinks is None, "the paged kernels take no attention sinks"
        out = query.new_empty(query.shape[0], query.shape[1], query.shape[3])
        flat = query[:, :, 0]  # [rows, heads, head_dim]
        _attend_in_pool(key.kernel_batch, flat, key.pool, value.pool, scaling, out, window, softcap)
        return out[:, None], None
    if not isinstance(key, GroupedKV):
        assert isinstance(value, torch.Tensor)
        if window is not None and attention_mask is not None:
            attention_mask = _windowed(attention_mask, window)
        if eager:
            assert attention_mask is not None
            out = _grouped_query_attention(
                query, key, value, attention_mask, scaling, softcap, sinks
            )
            return out, None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    assert isinstance(value, GroupedKV) and query.shape[0] == 1
    heads, tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    out = query.new_empty(tokens, heads, head_dim)
    if key.kernel_batch is not None:  # the groups without a mask
        assert key.pool is not None and value.pool is not None
        assert sinks is None, "the paged kernels take no attention sinks"
        flat = query[0].transpose(0, 1)  # [tokens, heads, head_dim]
        _attend_in_pool(key.kernel_batch, flat, key.pool, value.pool, scaling, out, window, softcap)
    for group, keys, values in zip(key.groups, key.parts, value.parts, strict=True):
        if keys is None or values is None or group.mask is None:
            continue  # the kernel's
        part = query[0, :, group.tokens]  # [heads, rows * T, head_dim]
        per_row = part.shape[1] // group.rows
        rows_query = part.reshape(heads, group.rows, per_row, head_dim).transpose(0, 1)
        mask = group.mask if window is None else _windowed(group.mask, window)
        if per_row == 1 and not eager:  # decoding rows: transformers stacks the heads
            result, _ = sdpa_attention_forward(
                module, rows_query, keys, values, mask, scaling=scaling, **kwargs
            )
        else:
            result = _grouped_query_attention(
                rows_query, keys, values, mask, scaling, softcap, sinks
            )
        out[group.tokens] = result.reshape(-1, heads, head_dim)  # [rows, T, heads, head_dim]
    return out[None], None  # [1, tokens, heads, head_dim]


def _attend_in_pool(
    batch: KernelBatch,
    query: torch.Tensor,  # [tokens, heads, head_dim]
    keys: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim] this layer's pool
    values: torch.Tensor,
    scaling: float | None,
    out: torch.Tensor,  # [tokens, heads, head_dim]: the batch's tokens are written
    window: int | None = None,
    softcap: float | None = None,
) -> None:
    scale = scaling or query.shape[-1] ** -0.5
    batch.kernel.attend(query, keys, values, batch, scale, out, window=window, softcap=softcap)


def _grouped_query_attention(
    query: torch.Tensor,  # [rows, heads, T, head_dim]
    key: torch.Tensor,  # [rows, kv_heads, kv_length, head_dim]
    value: torch.Tensor,  # [rows, kv_heads, kv_length, head_dim]
    mask: torch.Tensor,  # [rows, 1, T, kv_length] additive
    scaling: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [heads]
) -> torch.Tensor:  # [rows, T, heads, head_dim]
    """SDPA with the query heads that share a KV head stacked as query rows.

    With attention logit soft-capping (Gemma 2) or attention sinks (GPT-OSS), which SDPA
    does not take, always the two GEMMs of the family's own eager attention.

    With a mask, transformers' SDPA path copies every key/value head out to its query
    heads (`repeat_kv`: 3x the bytes on SmolLM2's 9 query / 3 KV heads) for any query
    longer than one token. A prefill chunk beside decoding rows is short and, late in a
    long prompt, attends to thousands of tokens, so that copy was most of its cost: 16
    tokens over 6,000 of context took 2.39 ms a layer through repeat_kv and 1.81 ms
    stacked (2 cores, one layer alone, load average 3.5). Chunks of up to
    `EAGER_MAX_CHUNK` tokens then take two GEMMs instead of SDPA (`_eager_attention`).
    """
    rows, heads, length, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # Head h reads KV head h // groups (transformers' repeat_kv order).
    stacked = query.reshape(rows, kv_heads, groups * length, head_dim)
    stacked_mask = mask[:, :, None].expand(rows, 1, groups, length, kv_length)
    stacked_mask = stacked_mask.reshape(rows, 1, groups * length, kv_length)
    if sinks is not None:  # stacked row g * T + t of KV head k is query head k * groups + g
        sinks = sinks.reshape(kv_heads, groups, 1).expand(kv_heads, groups, length)
        sinks = sinks.reshape(1, kv_heads, groups * length, 1).expand(rows, -1, -1, -1)
    if (
        softcap is not None
        or sinks is not None
        or (length <= EAGER_MAX_CHUNK and kv_length >= EAGER_MIN_CONTEXT)
    ):
        scale = scaling or head_dim**-0.5
        out = _eager_attention(stacked, key, value, stacked_mask, scale, softcap, sinks)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            stacked, key, value, attn_mask=stacked_mask, scale=scaling
        )  # [rows, kv_heads, groups * T, head_dim]
    return out.reshape(rows, heads, length, head_dim).transpose(1, 2)


def _eager_attention(
    query: torch.Tensor,  # [rows, kv_heads, Q, head_dim]
    key: torch.Tensor,  # [rows, kv_heads, kv_length, head_dim]
    value: torch.Tensor,
    mask: torch.Tensor,  # [rows, 1, Q, kv_length] additive
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [rows, kv_heads, Q, 1]
) -> torch.Tensor:  # [rows, kv_heads, Q, head_dim]
    """Scores, softmax in float32, weighted values: transformers' eager attention.

    For a few query rows over a long context the two batched GEMMs beat SDPA's CPU flash
    kernel, which splits its work by query block and head only (3 tasks on 2 cores for an
    8-token chunk on SmolLM2): one layer, 2 cores, 8 tokens over 5,800 of context 1.12 ->
    0.58 ms, 16 over 3,000 0.98 -> 0.58 ms, 16 over 1,000 0.31 -> 0.17 ms; but 32 over
    2,000 1.19 -> 2.29 ms and 64 over 500 0.67 -> 1.11 ms, hence `EAGER_MAX_CHUNK`.
    """
    # Contiguous first: the batched GEMMs copy a strided operand each (keys once for the
    # scores, values once more), a gathered row sliced to its length is strided.
    key, value = key.contiguous(), value.contiguous()
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:  # Gemma 2, as its eager attention: tanh(scores / cap) * cap
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask
    if sinks is not None:  # GPT-OSS: a sink column per head in a softmax in the scores' dtype
        combined = torch.cat([scores, sinks.to(scores.dtype)], dim=-1)
        combined = combined - combined.amax(dim=-1, keepdim=True)
        weights = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        return torch.matmul(weights.to(value.dtype), value)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


def _windowed(mask: torch.Tensor, window: int) -> torch.Tensor:
    """A causal additive mask [rows, 1, T, kv_length] cut to a sliding window: each query
    sees the `window` positions up to its own, as transformers' sliding-window masks do
    (`kv > q - window`).

    Every mask the runner builds allows a query exactly the columns up to its own position
    (its row's cache holds position p in column p), so the query's position is its last
    allowed column; the window is cut from there, whichever pass built the mask.
    """
    allowed = mask == 0  # [rows, 1, T, kv_length]
    columns = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(allowed, columns, -1).amax(dim=-1, keepdim=True)  # [rows, 1, T, 1]
    keep = allowed & (columns > last - window)
    return torch.zeros_like(mask).masked_fill_(~keep, torch.finfo(mask.dtype).min)


def register_engine_attention() -> str:
    """Make `ENGINE_ATTENTION` known to transformers (idempotent); return its name."""
    AttentionInterface.register(ENGINE_ATTENTION, paged_attention_forward)
    return ENGINE_ATTENTION
