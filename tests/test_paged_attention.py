"""The native paged-attention kernel against plain softmax attention and against the torch
path it replaces (gather each row's blocks, then transformers' SDPA)."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loramux.server.kv_cache import KernelBatch
from loramux.server.native_build import NativeKernelUnavailable, compiler
from loramux.server.paged_attention import choose_kernel, unsupported
from loramux.server.paged_attention.native import (
    BUILDS,
    SOFTMAX_BLOCK,
    SOURCE,
    PagedAttentionKernel,
    cpu_isa,
    load_kernel,
)

KV_HEADS, GROUPS, HEAD_DIM, BLOCK, NUM_BLOCKS = 3, 3, 64, 16, 1200  # SmolLM2's attention
HEADS = KV_HEADS * GROUPS
SCALE = HEAD_DIM**-0.5


@pytest.fixture(scope="module")
def kernel() -> PagedAttentionKernel:
    """The kernel; skipped only where the CPU or the compiler is missing (a kernel that
    fails to build fails these tests)."""
    try:
        cpu_isa()
        compiler()
    except NativeKernelUnavailable as exc:
        pytest.skip(f"native paged attention unavailable here: {exc}")
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
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [tokens, heads, head_dim]
    out = torch.empty_like(query)
    batch = _batch(kernel, specs, tables)
    kernel.attend(query, *pool, batch, SCALE, out, window=window, softcap=softcap)
    return out


def _gathered(pool: torch.Tensor, table: list[int], length: int) -> torch.Tensor:
    return pool[:, table].reshape(KV_HEADS, -1, HEAD_DIM)[:, :length]  # [kv_heads, L, hd]


def _reference(
    pool: tuple[torch.Tensor, torch.Tensor],
    query: torch.Tensor,
    specs: list[tuple[int, int]],
    tables: list[list[int]],
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # float64 softmax attention, causal from each query's position
    outs, token = [], 0
    for (count, first), table in zip(specs, tables, strict=True):
        length = first + count
        keys = _gathered(pool[0], table, length).double().repeat_interleave(GROUPS, 0)
        values = _gathered(pool[1], table, length).double().repeat_interleave(GROUPS, 0)
        q = query[token : token + count].transpose(0, 1).double()  # [heads, count, hd]
        scores = q @ keys.transpose(1, 2) * SCALE
        if softcap is not None:  # Gemma 2's eager attention: after the scaling
            scores = torch.tanh(scores / softcap) * softcap
        positions = torch.arange(first, length)[:, None]
        visible = torch.arange(length)[None, :] <= positions
        if window is not None:  # transformers' sliding_window_overlay: kv > q - window
            visible &= torch.arange(length)[None, :] > positions - window
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


WINDOWED = {  # (window, case): windows within a 16-key group, of blocks, of softmax blocks
    1: "decode rows and chunks together",
    7: "decode rows across block edges",
    16: "whole prompt, several query tiles",
    100: "chunk over a long context",
    SOFTMAX_BLOCK + 3: "decode row over several softmax blocks",
    4096: "decode rows and chunks together",  # longer than most of their contexts
}


@pytest.mark.parametrize("window", WINDOWED)
@pytest.mark.parametrize("softcap", [None, 0.7, 30.0])
def test_sliding_windows_and_soft_capping_equal_softmax_attention(
    kernel: PagedAttentionKernel,
    pool: tuple[torch.Tensor, torch.Tensor],
    window: int,
    softcap: float | None,
) -> None:
    """Sliding windows (keys at positions > the query's - window, transformers' mask) and
    Gemma 2's logit soft-capping (cap * tanh(scores / cap) after the scaling; caps below and
    far above the scores' range), alone and together, against float64 attention."""
    specs = CASES[WINDOWED[window]]
    tables = _tables(specs, seed=window)
    tokens = sum(count for count, _ in specs)
    generator = torch.Generator().manual_seed(window)
    query = (torch.randn(tokens, HEADS, HEAD_DIM, generator=generator) * 1.5).to(torch.bfloat16)
    got = _attend(kernel, pool, query, specs, tables, window, softcap).double()
    want = _reference(pool, query, specs, tables, window, softcap)
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
    """Windows and soft-capping are the kernel's; attention sinks and head sizes it does
    not take are refused by name (auto: the torch path; native: a start-up error)."""
    plain = SimpleNamespace(num_attention_heads=9)
    assert unsupported(plain, HEAD_DIM, KV_HEADS, BLOCK) is None
    assert "head size 80" in (unsupported(plain, 80, KV_HEADS, BLOCK) or "")
    gemma2 = SimpleNamespace(
        num_attention_heads=9, sliding_window=4096, attn_logit_softcapping=50.0
    )
    assert unsupported(gemma2, HEAD_DIM, KV_HEADS, BLOCK) is None
    sinks = unsupported(plain, HEAD_DIM, KV_HEADS, BLOCK, variants=("attention sinks",))
    assert sinks == "attention sinks"  # as the engine's probe names them (model_support)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="attention sinks"):
        choose_kernel("native", cpu, plain, HEAD_DIM, KV_HEADS, BLOCK, ("attention sinks",))
    assert (
        choose_kernel("auto", cpu, plain, HEAD_DIM, KV_HEADS, BLOCK, ("attention sinks",)) is None
    )
    assert choose_kernel("torch", cpu, plain, HEAD_DIM, KV_HEADS, BLOCK) is None
    with pytest.raises(ValueError, match="unknown attention kernel"):
        choose_kernel("fast", cpu, plain, HEAD_DIM, KV_HEADS, BLOCK)


def test_the_build_is_chosen_by_the_cpu(kernel: PagedAttentionKernel) -> None:
    """native: the build this CPU runs (AVX-512 BF16 first); auto takes only the AVX-512
    one (the AVX2 build only when asked for)."""
    assert kernel.isa == cpu_isa() and kernel.isa in BUILDS
    cpu = torch.device("cpu")
    gemma2 = SimpleNamespace(
        num_attention_heads=9, sliding_window=4096, attn_logit_softcapping=50.0
    )
    native = choose_kernel("native", cpu, gemma2, HEAD_DIM, KV_HEADS, BLOCK)
    assert native is kernel
    auto = choose_kernel("auto", cpu, gemma2, HEAD_DIM, KV_HEADS, BLOCK)
    assert auto is (kernel if kernel.isa == "avx512_bf16" else None)


def test_both_builds_compile(tmp_path: Path) -> None:
    """The one source builds for AVX-512 BF16 and for AVX2 + FMA with the flags the loader
    uses, whichever CPU runs the tests (the build this CPU lacks is compiled, not run), so
    neither build can rot unseen."""
    try:
        cxx = compiler()
    except NativeKernelUnavailable as exc:
        pytest.skip(str(exc))
    for isa, (flags, _) in BUILDS.items():
        target = tmp_path / f"{isa}.so"
        done = subprocess.run(
            [cxx, *flags, str(SOURCE), "-o", str(target)], capture_output=True, text=True
        )
        assert done.returncode == 0, (isa, done.stderr[-3000:])
        assert target.stat().st_size > 0
        symbols = subprocess.run(["nm", "-D", str(target)], capture_output=True, text=True)
        assert "loramux_paged_attention" in symbols.stdout, isa
