"""Paged attention in Triton, straight from the KV block pool (the `PoolAttention` protocol).

Import through `loramux.server.triton_runtime.prepare(device)` first (compiled on CUDA,
interpreted on the CPU for tests and dry runs).

One program per (sequence, query token, KV head): the query heads that share the KV head
(GQA) are taken together, so each key/value block is read once for all of them; the
program walks the sequence's block table up to its own position (causal: a chunk's token
t sees the context and the chunk's tokens up to t) with an online softmax in float32
(running max and sum, rescaled per block), and writes the weighted values in the output
dtype. Decoding rows are sequences of one query token; a prefill chunk one sequence of
many, over the blocks its earlier chunks and shared prefix blocks filled. The same
softmax arithmetic as the torch path (scores and weights in float32, bf16 out) up to the
order of the float32 sums.

Per call (the model passes them per layer), as the torch path computes them: a sliding
window (a query at position p sees keys at positions > p - window, transformers'
sliding-window mask; blocks wholly before the window are not read) and logit soft-capping
(scores = cap * tanh(scores / cap) after the scaling, before the softmax: Gemma 2's eager
attention). Attention sinks (GPT-OSS) are not computed here.

Written for clarity and correctness first: scores are `tl.sum` reductions, not `tl.dot`
(a KV head has few query heads, below tl.dot's 16 rows), and a chunk's tokens do not share
their key loads. Not measured on a GPU (none has been available; docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.server.kv_cache import KernelBatch
from loramux.server.lora.backend.triton_ops import round_to


@triton.jit
def _paged_attention(
    q_ptr,  # [tokens, heads, head_dim]
    k_ptr,  # [kv_heads, num_blocks, block_size, head_dim]
    v_ptr,  # same
    out_ptr,  # [tokens, heads, head_dim]
    seq_ptr,  # [n, 4] int64: first query token, query tokens, first position, table offset
    tables_ptr,  # [total blocks] int64
    stride_qt,
    stride_qh,
    stride_kh,
    stride_kb,
    stride_ks,
    stride_ot,
    stride_oh,
    scale,
    head_dim,
    groups,
    block_size,
    window,  # keys at positions > the query's - window (unused without WINDOWED)
    softcap,  # scores = softcap * tanh(scores / softcap) (unused without SOFTCAP)
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    t = tl.program_id(1)
    kv_head = tl.program_id(2)
    count = tl.load(seq_ptr + seq * 4 + 1)
    if t < count:
        token = tl.load(seq_ptr + seq * 4) + t
        position = tl.load(seq_ptr + seq * 4 + 2) + t
        table = tl.load(seq_ptr + seq * 4 + 3)
        offs_g = tl.arange(0, BLOCK_G)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < groups
        d_ok = offs_d < head_dim
        heads = kv_head * groups + offs_g
        q_where = token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr + q_where, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        q = q.to(tl.float32)
        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        first = 0  # the oldest key position the query sees
        if WINDOWED:  # transformers' sliding-window mask: kv > q - window
            first = tl.maximum(position - window + 1, 0)
        b = first // block_size  # blocks wholly before the window are not read
        while b <= position // block_size:  # a while loop: the interpreter cannot range()
            block = tl.load(tables_ptr + table + b)
            key_position = b * block_size + offs_s
            s_ok = (offs_s < block_size) & (key_position <= position) & (key_position >= first)
            kv_where = (
                kv_head * stride_kh
                + block * stride_kb
                + offs_s[:, None] * stride_ks
                + offs_d[None, :]
            )
            kv_ok = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_where, mask=kv_ok, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, S]
            if SOFTCAP:  # Gemma 2's eager attention, after the scaling, before the mask
                # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp -> 0 or inf)
                scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
            scores = tl.where(s_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_where, mask=kv_ok, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
            b += 1
        o = acc / l_i[:, None]
        o_where = token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(
            out_ptr + o_where,
            round_to(o, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )


class TritonPagedAttention:
    """`PoolAttention` by the Triton kernel above; any head size, block size and GQA ratio,
    with a sliding window (per call: per layer) and logit soft-capping."""

    name = "triton"

    def attend(
        self,
        query: torch.Tensor,  # [tokens, heads, head_dim], head_dim contiguous
        keys: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim], head_dim contiguous
        values: torch.Tensor,  # same, same strides
        batch: KernelBatch,
        scale: float,
        out: torch.Tensor,  # [tokens, heads, head_dim]: the batch's tokens are written
        window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        kv_heads, _, block_size, head_dim = keys.shape
        heads = query.shape[1]
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads over {kv_heads} KV heads")
        if query.stride(2) != 1 or keys.stride(3) != 1 or out.stride(2) != 1:
            raise ValueError("the Triton paged-attention kernel reads head_dim contiguous")
        if keys.stride() != values.stride():
            raise ValueError("keys and values must share one layout")
        sequences = batch.sequences
        if sequences.shape[0] == 0:
            return
        groups = heads // kv_heads
        grid = (sequences.shape[0], batch.longest, kv_heads)
        _paged_attention[grid](
            query, keys, values, out, sequences, batch.tables,
            query.stride(0), query.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2),
            out.stride(0), out.stride(1),
            scale, head_dim, groups, block_size, window or 0, softcap or 0.0,
            WINDOWED=window is not None, SOFTCAP=softcap is not None,
            BLOCK_G=triton.next_power_of_2(groups),
            BLOCK_S=triton.next_power_of_2(block_size),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip
