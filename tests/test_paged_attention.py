"""The native paged-attention kernel against plain softmax attention and against the torch
path it replaces (gather each row's blocks, then transformers' SDPA)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loramux.server.kv_cache import KernelBatch
from loramux.server.native_build import NativeKernelUnavailable, compiler, cpu_lacks
from loramux.server.paged_attention import choose_kernel, unsupported
from loramux.server.paged_attention.native import SOFTMAX_BLOCK, PagedAttentionKernel, load_kernel

KV_HEADS, GROUPS, HEAD_DIM, BLOCK, NUM_BLOCKS = 3, 3, 64, 16, 1200  # SmolLM2's attention
HEADS = KV_HEADS * GROUPS
SCALE = HEAD_DIM**-0.5


@pytest.fixture(scope="module")
def kernel() -> PagedAttentionKernel:
    """The kernel; skipped only where the CPU or the compiler is missing (a kernel that
    fails to build fails these tests)."""
    reason = cpu_lacks()
    if reason is None:
        try:
            compiler()
        except NativeKernelUnavailable as exc:
            reason = str(exc)
    if reason is not None:
        pytest.skip(f"native paged attention unavailable here: {reason}")
    return load_kernel()


@pytest.fixture(scope="module")
def pool() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (KV_HEADS, NUM_BLOCKS, BLOCK, HEAD_DIM)
    keys = (torch.randn(shape, generator=generator) * 1.5).to(torch.bfloat16)
    values = torch.randn(shape, generator=generator).to(torch.bfloat16)
    return keys, values


def _tables(specs: list[tuple[int, int]], seed: int) -> list[list[int]]:
    """A block table per (query tokens, first position), blocks scattered over the pool."""
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for count, first in specs:
        blocks = -(-(first + count) // BLOCK)
        tables.append([order.pop() for _ in range(blocks)])
    return tables


def _batch(
    kernel: PagedAttentionKernel, specs: list[tuple[int, int]], tables: list[list[int]]
) -> KernelBatch:
    rows, flat, token = [], [], 0
    for (count, first), table in zip(specs, tables, strict=True):
        rows.append((token, count, first, len(flat)))
        flat += table
        token += count
    return KernelBatch(torch.tensor(rows), torch.tensor(flat), kernel)


def _attend(
    kernel: PagedAttentionKernel,
    pool: tuple[torch.Tensor, torch.Tensor],
    query: torch.Tensor,  # [tokens, heads, head_dim]
    specs: list[tuple[int, int]],
    tables: list[list[int]],
) -> torch.Tensor:  # [tokens, heads, head_dim]
    out = torch.empty_like(query)
    kernel.attend(query, *pool, _batch(kernel, specs, tables), SCALE, out)
    return out


def _gathered(pool: torch.Tensor, table: list[int], length: int) -> torch.Tensor:
    return pool[:, table].reshape(KV_HEADS, -1, HEAD_DIM)[:, :length]  # [kv_heads, L, hd]


def _reference(
    pool: tuple[torch.Tensor, torch.Tensor],
    query: torch.Tensor,
    specs: list[tuple[int, int]],
    tables: list[list[int]],
) -> torch.Tensor:  # float64 softmax attention, causal from each query's position
    outs, token = [], 0
    for (count, first), table in zip(specs, tables, strict=True):
        length = first + count
        keys = _gathered(pool[0], table, length).double().repeat_interleave(GROUPS, 0)
        values = _gathered(pool[1], table, length).double().repeat_interleave(GROUPS, 0)
        q = query[token : token + count].transpose(0, 1).double()  # [heads, count, hd]
        scores = q @ keys.transpose(1, 2) * SCALE
        visible = torch.arange(length)[None, :] <= torch.arange(first, length)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        outs.append((torch.softmax(scores, -1) @ values).transpose(0, 1))
        token += count
    return torch.cat(outs)


CASES = {
    "one decode row, first token": [(1, 0)],
    "decode rows across block edges": [(1, 15), (1, 16), (1, 17), (1, 31)],
    "31 decode rows": [(1, 300 + 7 * i) for i in range(31)],
    "decode row over several softmax blocks": [(1, SOFTMAX_BLOCK * 3 + 5)],
    "chunk over a long context": [(11, 5000)],
    "whole prompt, several query tiles": [(70, 0)],
    "decode rows and chunks together": [(1, 40), (1, 900), (13, 2100), (3, 7)],
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_softmax_attention(
    kernel: PagedAttentionKernel, pool: tuple[torch.Tensor, torch.Tensor], case: str
) -> None:
    specs = CASES[case]
    tables = _tables(specs, seed=len(case))
    tokens = sum(count for count, _ in specs)
    query = (torch.randn(tokens, HEADS, HEAD_DIM) * 1.5).to(torch.bfloat16)
    got = _attend(kernel, pool, query, specs, tables).double()
    want = _reference(pool, query, specs, tables)
    # bf16 output: half an ulp of the largest value is 2^-9 of it; two ulps allowed.
    assert (got - want).abs().max() <= 2 * 2**-8 * want.abs().max()


def test_decode_rows_equal_the_torch_path_within_bf16_rounding(
    kernel: PagedAttentionKernel, pool: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """What the engine did before the kernel: gather, then transformers' SDPA (pack_gqa)."""
    specs = CASES["31 decode rows"]
    tables = _tables(specs, seed=1)
    query = (torch.randn(len(specs), HEADS, HEAD_DIM) * 1.5).to(torch.bfloat16)
    got = _attend(kernel, pool, query, specs, tables).double()
    length = max(first + 1 for _, first in specs)
    blocks = -(-length // BLOCK)
    padded = [t + [0] * (blocks - len(t)) for t in tables]
    keys = torch.stack([_gathered(pool[0], t, length) for t in padded])
    values = torch.stack([_gathered(pool[1], t, length) for t in padded])
    visible = torch.arange(length)[None, :] <= torch.tensor([f for _, f in specs])[:, None]
    mask = torch.zeros(len(specs), 1, 1, length, dtype=torch.bfloat16)
    mask = mask.masked_fill(~visible[:, None, None], torch.finfo(torch.bfloat16).min)
    module = SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True, training=False)
    sdpa, _ = sdpa_attention_forward(module, query[:, :, None], keys, values, mask, scaling=SCALE)
    want = sdpa[:, 0].double()  # [rows, heads, hd]
    assert (got - want).abs().max() <= 2 * 2**-8 * want.abs().max()


def test_a_prompt_in_chunks_equals_it_in_one_call_bit_for_bit(
    kernel: PagedAttentionKernel, pool: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Each query's result depends on its own keys only, not on which others share its call
    or its chunk: a prompt's chunks give exactly what one pass over it gives."""
    length = SOFTMAX_BLOCK * 2 + 100
    table = _tables([(length, 0)], seed=3)[0]
    query = (torch.randn(length, HEADS, HEAD_DIM) * 1.5).to(torch.bfloat16)
    whole = _attend(kernel, pool, query, [(length, 0)], [table])
    cuts = [0, 7, 500, 1111, length]
    specs = [(b - a, a) for a, b in itertools.pairwise(cuts)]
    chunks = _attend(kernel, pool, query, specs, [table[: -(-b // BLOCK)] for b in cuts[1:]])
    assert torch.equal(whole, chunks)


def test_unsupported_attention_is_named() -> None:
    plain = SimpleNamespace(num_attention_heads=9)
    assert unsupported(plain, HEAD_DIM, KV_HEADS, BLOCK) is None
    assert "head size 80" in (unsupported(plain, 80, KV_HEADS, BLOCK) or "")
    windowed = SimpleNamespace(num_attention_heads=9, sliding_window=4096)
    assert "sliding-window" in (unsupported(windowed, HEAD_DIM, KV_HEADS, BLOCK) or "")
    capped = SimpleNamespace(num_attention_heads=9, attn_logit_softcapping=50.0)
    assert "logit soft-capping" in (unsupported(capped, HEAD_DIM, KV_HEADS, BLOCK) or "")
    sinks = unsupported(plain, HEAD_DIM, KV_HEADS, BLOCK, variants=("attention sinks",))
    assert sinks == "attention sinks"  # as the engine's probe names them (model_support)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="sliding-window"):
        choose_kernel("native", cpu, windowed, HEAD_DIM, KV_HEADS, BLOCK)
    assert choose_kernel("auto", cpu, windowed, HEAD_DIM, KV_HEADS, BLOCK) is None
    assert choose_kernel("torch", cpu, plain, HEAD_DIM, KV_HEADS, BLOCK) is None
    with pytest.raises(ValueError, match="unknown attention kernel"):
        choose_kernel("fast", cpu, plain, HEAD_DIM, KV_HEADS, BLOCK)
