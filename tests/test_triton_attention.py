"""The Triton paged-attention kernel through Triton's interpreter, against float64 softmax
attention computed from each sequence's blocks gathered by its block table.

Tiny pools (the interpreter runs each program in numpy): decoding rows (one query token)
and prefill chunks (several, causal inside the chunk) in one call, GQA (two query heads
per KV head, and a head count that is not a power of two), block tables with holes
(blocks scattered over the pool, unused blocks filled with NaN, which a read of them
would spread), two sequences sharing their prefix blocks, a block size and a head size
that are not powers of two; sliding windows (shorter and longer than the contexts) and
logit soft-capping, each alone and together, as transformers' masks and Gemma 2's eager
attention define them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loramux.server.kv_cache import KernelBatch
from loramux.server.paged_attention import choose_kernel

CPU = torch.device("cpu")
# relative error of a bf16 output against float64: its rounding is up to 2^-9 of the
# value, the float32 sums ~1e-6 of the largest value; twice the rounding bound.
BF16_RTOL = 2**-8


def _kernel(heads: int, kv_heads: int) -> object:
    config = SimpleNamespace(num_attention_heads=heads)
    return choose_kernel("triton", CPU, config, head_dim=16, kv_heads=kv_heads, block_size=4)


def _pool(kv_heads: int, blocks: int, block: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    shape = (kv_heads, blocks, block, head_dim)
    keys = (torch.randn(shape, generator=generator) * 1.5).bfloat16()
    values = torch.randn(shape, generator=generator).bfloat16()
    return keys, values


def _reference(
    query: torch.Tensor,  # [tokens, heads, head_dim]
    keys: torch.Tensor,  # [kv_heads, blocks, block, head_dim]
    values: torch.Tensor,
    specs: list[tuple[int, int, list[int]]],  # (query tokens, first position, table)
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [tokens, heads, head_dim] float64
    kv_heads, _, _, head_dim = keys.shape
    groups = query.shape[1] // kv_heads
    out = torch.zeros(query.shape, dtype=torch.float64)
    token = 0
    for count, first, table in specs:
        k = keys[:, table].reshape(kv_heads, -1, head_dim).double()  # [kv_heads, len, d]
        v = values[:, table].reshape(kv_heads, -1, head_dim).double()
        for t in range(count):
            position = first + t  # causal: its context and the chunk up to itself
            keys_seen = torch.arange(k.shape[1]) <= position
            if window is not None:  # transformers' sliding_window_overlay: kv > q - window
                keys_seen &= torch.arange(k.shape[1]) > position - window
            for head in range(query.shape[1]):
                kv = head // groups
                scores = k[kv] @ query[token, head].double() * scale
                if softcap is not None:  # Gemma 2's eager attention: after the scaling
                    scores = torch.tanh(scores / softcap) * softcap
                scores = scores.masked_fill(~keys_seen, float("-inf"))
                weights = torch.softmax(scores, dim=0)
                out[token, head] = weights[keys_seen] @ v[kv, keys_seen]
            token += 1
    return out


def _run(
    heads: int,
    kv_heads: int,
    head_dim: int,
    block: int,
    specs: list[tuple[int, int, list[int]]],
    blocks: int,
    window: int | None = None,
    softcap: float | None = None,
) -> None:
    keys, values = _pool(kv_heads, blocks, block, head_dim)
    used = {b for _, _, table in specs for b in table}
    for b in range(blocks):  # the holes: a kernel that reads them gets NaN
        if b not in used:
            keys[:, b] = float("nan")
            values[:, b] = float("nan")
    tokens = sum(count for count, _, _ in specs)
    query = torch.randn(tokens, heads, head_dim, generator=torch.Generator().manual_seed(1))
    query = query.bfloat16()
    rows, flat, first_token = [], [], 0
    for count, first, table in specs:
        rows.append((first_token, count, first, len(flat)))
        flat += table[: -(-(first + count) // block)]
        first_token += count
    kernel = _kernel(heads, kv_heads)
    assert kernel is not None and kernel.name == "triton"
    longest = max(count for count, _, _ in specs)
    batch = KernelBatch(torch.tensor(rows), torch.tensor(flat), kernel, longest)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    kernel.attend(query, keys, values, batch, scale, out, window=window, softcap=softcap)
    expected = _reference(query, keys, values, specs, scale, window, softcap)
    torch.testing.assert_close(out.double(), expected, rtol=BF16_RTOL, atol=1e-5)


def test_decode_rows_and_chunks_with_holes_and_a_shared_prefix() -> None:
    """Block size 4, 6 query heads over 3 KV heads, head size 16; the first two sequences
    share their first two blocks (a prefix cache hit); tables skip over unused blocks."""
    shared = [7, 2]
    specs = [
        (1, 9, [*shared, 11]),  # a decoding row at position 9 (its 10th token)
        (3, 8, [*shared, 5]),  # a chunk of 3 tokens after 8 cached ones, same prefix
        (1, 0, [13]),  # a first token
        (5, 0, [1, 14]),  # a whole prompt as one chunk
        (1, 3, [9]),  # a row whose last block is full after this token
    ]
    _run(heads=6, kv_heads=3, head_dim=16, block=4, specs=specs, blocks=16)


def test_odd_block_and_head_sizes_one_query_head_per_kv_head() -> None:
    """Block size 3 and head size 24 (padded to powers of two inside the kernel), no GQA."""
    specs = [(2, 4, [3, 0]), (1, 6, [5, 1, 4])]
    _run(heads=2, kv_heads=2, head_dim=24, block=3, specs=specs, blocks=7)


SHARED = [7, 2]
# Ragged: decoding rows at the start, in the middle and at the end of a block, chunks after
# a shared prefix and whole prompts, long enough (up to 16 positions) for windows of 1 to 20
MIXED = [
    (1, 9, [*SHARED, 11]),  # a decoding row at position 9 (its 10th token)
    (3, 8, [*SHARED, 5]),  # a chunk of 3 tokens after 8 cached ones, same prefix
    (1, 0, [13]),  # a first token
    (5, 0, [1, 14]),  # a whole prompt as one chunk
    (4, 12, [*SHARED, 3, 6]),  # a chunk ending at position 15, same prefix
    (1, 4, [0, 10]),  # a decoding row at the start of its second block
]


@pytest.mark.parametrize("window", [1, 3, 4, 6, 9, 20])
def test_sliding_window(window: int) -> None:
    """A window of one key, windows shorter than a block, of a block, across block edges,
    and longer than every context (then plain causal attention): keys at positions
    > the query's - window, transformers' own sliding-window mask."""
    _run(heads=6, kv_heads=3, head_dim=16, block=4, specs=MIXED, blocks=16, window=window)


@pytest.mark.parametrize("softcap", [0.5, 3.0, 50.0])
def test_logit_soft_capping(softcap: float) -> None:
    """Caps below, near and far above the scores (standard deviation ~1.5 here)."""
    _run(heads=6, kv_heads=3, head_dim=16, block=4, specs=MIXED, blocks=16, softcap=softcap)


def test_sliding_window_and_soft_capping_together_odd_sizes() -> None:
    """Gemma 2's sliding layers: both at once; block size 3, head size 24, no GQA."""
    specs = [(2, 4, [3, 0]), (1, 6, [5, 1, 4]), (3, 5, [3, 2, 6])]
    _run(heads=2, kv_heads=2, head_dim=24, block=3, specs=specs, blocks=7, window=4, softcap=1.0)


def test_the_kernel_is_refused_where_the_attention_is_not_what_it_computes() -> None:
    """Sliding windows and soft-capping are the Triton kernel's; attention sinks are not."""
    from loramux.server.model_support import SINKS, SLIDING_WINDOW, SOFTCAP

    windowed = SimpleNamespace(num_attention_heads=4, sliding_window=8, attn_logit_softcapping=50.0)
    kernel = choose_kernel("triton", CPU, windowed, head_dim=16, kv_heads=2, block_size=4)
    assert kernel is not None and kernel.name == "triton"
    plain = SimpleNamespace(num_attention_heads=4)
    variants = (SLIDING_WINDOW, SOFTCAP)
    kernel = choose_kernel("triton", CPU, plain, 16, 2, 4, variants=variants)
    assert kernel is not None and kernel.name == "triton"
    with pytest.raises(ValueError, match="attention sinks"):
        choose_kernel("triton", CPU, plain, 16, 2, 4, variants=(SINKS, SLIDING_WINDOW))
    uneven = SimpleNamespace(num_attention_heads=5)
    with pytest.raises(ValueError, match="5 query heads over 2 KV heads"):
        choose_kernel("triton", CPU, uneven, head_dim=16, kv_heads=2, block_size=4)


@pytest.mark.parametrize("pooled", [True, False])
def test_the_engines_attention_hands_each_layers_window_and_cap_to_the_kernel(
    pooled: bool,
) -> None:
    """attention.py's `paged_attention_forward` with a Triton kernel batch and Gemma 2's
    per-layer arguments (`sliding_window`, `softcap`), as the model passes them: decoding
    rows alone (`PoolKV`, the decode pass) or with a prefill chunk (a `GroupedKV` whose
    groups are all the kernel's, the mixed pass). Each row's output is transformers' own
    Gemma 2 eager attention on its gathered keys and values under transformers' sliding
    window mask, within a bf16 rounding (the eager path caps bf16 scores, the kernel
    float32 ones)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from loramux.server.attention import paged_attention_forward
    from loramux.server.kv_cache import GroupedKV, PoolKV

    heads, kv_heads, head_dim, block, window, softcap = 4, 2, 16, 4, 5, 1.0
    keys, values = _pool(kv_heads, 12, block, head_dim)
    specs = [(1, 9, [7, 2, 11]), (1, 4, [0, 10])]  # decoding rows
    if not pooled:
        specs.append((3, 6, [3, 5, 8]))  # a chunk of 3 after 6 cached tokens
    tokens = sum(count for count, _, _ in specs)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, heads, tokens, head_dim, generator=generator).bfloat16()
    rows, flat, first_token = [], [], 0
    for count, first, table in specs:
        rows.append((first_token, count, first, len(flat)))
        flat += table
        first_token += count
    kernel = _kernel(heads, kv_heads)
    longest = max(count for count, _, _ in specs)
    batch = KernelBatch(torch.tensor(rows), torch.tensor(flat), kernel, longest)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    kwargs = {"sliding_window": window, "softcap": softcap, "s_aux": None}
    scale = head_dim**-0.5
    if pooled:  # the decode pass: [rows, heads, 1, head_dim]
        out, _ = paged_attention_forward(
            module, query[0].transpose(0, 1)[:, :, None], PoolKV(keys, batch),
            PoolKV(values, batch), None, scaling=scale, **kwargs,
        )  # fmt: skip
        out = out[:, 0]  # [tokens, heads, head_dim]
    else:
        out, _ = paged_attention_forward(
            module, query, GroupedKV([], [], keys, batch), GroupedKV([], [], values, batch),
            None, scaling=scale, **kwargs,
        )  # fmt: skip
        out = out[0]
    token = 0
    for count, first, table in specs:
        k = keys[:, table].reshape(1, kv_heads, -1, head_dim)
        v = values[:, table].reshape(1, kv_heads, -1, head_dim)
        positions = torch.arange(first, first + count)[:, None]
        columns = torch.arange(k.shape[2])[None, :]
        allowed = (columns <= positions) & (columns > positions - window)
        mask = torch.zeros(allowed.shape, dtype=torch.bfloat16)
        mask = mask.masked_fill_(~allowed, torch.finfo(torch.bfloat16).min)[None, None]
        expected, _ = eager_attention_forward(
            module, query[:, :, token : token + count], k, v, mask, scaling=scale,
            softcap=softcap,
        )  # fmt: skip
        torch.testing.assert_close(out[token : token + count], expected[0], atol=2e-2, rtol=2e-2)
        token += count
