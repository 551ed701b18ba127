"""Triton kernels of the LoRA backend: shrink and expand, segmented (SGMV) and gathered (BGMV).

Import through `loramux.server.triton_runtime.prepare(device)` first: it decides whether
these kernels are compiled for CUDA or interpreted on the CPU (tests, dry runs).

The work of one rank class of one fused group (`layer.ClassStack`: A [C, M*W, in],
row_scale [C, M*W], M x Bt [C, W, out_m]) for the tokens that use it, given as
*segments*: runs of consecutive tokens of the pass on one adapter (start, length, index
in the class stack). A prompt chunk is one segment; each decoding row a segment of one.

* shrink: s[t, :] = (x[t] @ A[index]^T) * row_scale[index] for every token of every
  segment, all M members at once (their A rows are stacked): float32 [T, M*W].
* expand: out_m[t] += bf16(s[t, m*W:(m+1)*W] @ Bt_m[index]), in place into the base
  output, rounded to the output's dtype before the add as PEFT's 4-bit layers do.

Each has two kernels, as Punica, vLLM and SGLang do: `sgmv_*` tiles a segment's tokens
(BLOCK_T rows per program, `tl.dot`), so a prompt's adapter weights are read once per
tile of tokens; `bgmv_*` takes one token per program and reduces with `tl.sum`, no 16-row
tile wasted on a decoding row.
x and the weights are widened to float32 (exactly: bf16 and int8 values are float32
values) and multiplied in float32 (`tl.dot(..., input_precision="ieee")`, no TF32), as
PEFT keeps its LoRA weights in float32 and runs its two GEMMs in float32. A bf16
tensor-core shrink would be faster on a GPU (its products are exact in float32 too) but
Triton 3.6's interpreter multiplies bf16 blocks as their raw 16-bit integers, so that
kernel could not be checked here; left until a GPU can measure it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 16  # tokens per SGMV tile (tl.dot needs >= 16)
BLOCK_R = 16  # rank rows per shrink program
BLOCK_K = 64  # input features per step of the shrink
BLOCK_N = 64  # output features per expand program
BLOCK_W = 16  # rank rows per step of the expand


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 `x` rounded to `dtype`, to nearest, ties to even (the hardware's and torch's
    conversion), returned as float32. For bf16 in integer arithmetic: Triton 3.6's
    interpreter truncates float32 -> bf16 casts (and its rounding mode for them is off by
    the carry), so the kernels round themselves and the cast after is exact on both."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def add_rounded(where, acc, ok):
    """out[where] = round(out[where] + round(acc)) in the output's dtype: the delta rounded
    to it first, then added, as torch's `out.add_(delta.to(out.dtype))` and PEFT's 4-bit
    layers (`result + lora(x).to(result.dtype)`)."""
    dtype: tl.constexpr = where.dtype.element_ty
    base = tl.load(where, mask=ok, other=0.0).to(tl.float32)
    total = round_to(base + round_to(acc, dtype), dtype)
    tl.store(where, total.to(dtype), mask=ok)


@triton.jit
def _sgmv_shrink(
    x_ptr,  # [T, in]
    a_ptr,  # [C, R, in]
    scale_ptr,  # [C, R] float32
    out_ptr,  # [T, R] float32
    starts_ptr,  # [S] int64
    lens_ptr,  # [S] int64
    index_ptr,  # [S] int64
    in_features: tl.constexpr,
    rank_rows: tl.constexpr,
    stride_x,
    stride_ac,
    stride_ar,
    stride_sc,
    stride_o,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.load(lens_ptr + seg)
    if tile * BLOCK_T < length:
        start = tl.load(starts_ptr + seg)
        index = tl.load(index_ptr + seg)
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_r = part * BLOCK_R + tl.arange(0, BLOCK_R)
        t_ok = offs_t < length
        r_ok = offs_r < rank_rows
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < in_features
            xs = tl.load(
                x_ptr + (start + offs_t)[:, None] * stride_x + offs_k[None, :],
                mask=t_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            a = tl.load(
                a_ptr + index * stride_ac + offs_r[:, None] * stride_ar + offs_k[None, :],
                mask=r_ok[:, None] & k_ok[None, :],
                other=0,
            )
            acc += tl.dot(xs.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="ieee")
        scale = tl.load(scale_ptr + index * stride_sc + offs_r, mask=r_ok, other=0.0)
        acc = acc * scale[None, :]
        tl.store(
            out_ptr + (start + offs_t)[:, None] * stride_o + offs_r[None, :],
            acc,
            mask=t_ok[:, None] & r_ok[None, :],
        )


@triton.jit
def _bgmv_shrink(
    x_ptr,  # [T, in]
    a_ptr,  # [C, R, in]
    scale_ptr,  # [C, R] float32
    out_ptr,  # [T, R] float32
    starts_ptr,  # [S] int64: the token of each one-token segment
    index_ptr,  # [S] int64
    in_features: tl.constexpr,
    rank_rows: tl.constexpr,
    stride_x,
    stride_ac,
    stride_ar,
    stride_sc,
    stride_o,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    part = tl.program_id(1)
    token = tl.load(starts_ptr + seg)
    index = tl.load(index_ptr + seg)
    offs_r = part * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank_rows
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < in_features
        xs = tl.load(x_ptr + token * stride_x + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + index * stride_ac + offs_r[:, None] * stride_ar + offs_k[None, :],
            mask=r_ok[:, None] & k_ok[None, :],
            other=0,
        ).to(tl.float32)
        acc += tl.sum(a * xs[None, :], axis=1)
    scale = tl.load(scale_ptr + index * stride_sc + offs_r, mask=r_ok, other=0.0)
    tl.store(out_ptr + token * stride_o + offs_r, acc * scale, mask=r_ok)


@triton.jit
def _sgmv_expand(
    s_ptr,  # [T, M*W] float32 (member m's columns start at col0)
    bt_ptr,  # [C, W, out] this member's B^T
    out_ptr,  # [T, out]: deltas added in place
    starts_ptr,
    lens_ptr,
    index_ptr,
    col0,
    width: tl.constexpr,
    out_features: tl.constexpr,
    stride_s,
    stride_bc,
    stride_bw,
    stride_o,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.load(lens_ptr + seg)
    if tile * BLOCK_T < length:
        start = tl.load(starts_ptr + seg)
        index = tl.load(index_ptr + seg)
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = part * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok = offs_t < length
        n_ok = offs_n < out_features
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for w0 in range(0, width, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            w_ok = offs_w < width
            s = tl.load(
                s_ptr + (start + offs_t)[:, None] * stride_s + col0 + offs_w[None, :],
                mask=t_ok[:, None] & w_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                bt_ptr + index * stride_bc + offs_w[:, None] * stride_bw + offs_n[None, :],
                mask=w_ok[:, None] & n_ok[None, :],
                other=0,
            ).to(tl.float32)
            acc += tl.dot(s, b, input_precision="ieee")
        where = out_ptr + (start + offs_t)[:, None] * stride_o + offs_n[None, :]
        add_rounded(where, acc, t_ok[:, None] & n_ok[None, :])


@triton.jit
def _bgmv_expand(
    s_ptr,  # [T, M*W] float32
    bt_ptr,  # [C, W, out]
    out_ptr,  # [T, out]
    starts_ptr,
    index_ptr,
    col0,
    width: tl.constexpr,
    out_features: tl.constexpr,
    stride_s,
    stride_bc,
    stride_bw,
    stride_o,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seg = tl.program_id(0)
    part = tl.program_id(1)
    token = tl.load(starts_ptr + seg)
    index = tl.load(index_ptr + seg)
    offs_n = part * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < out_features
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for w0 in range(0, width, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_ok = offs_w < width
        s = tl.load(s_ptr + token * stride_s + col0 + offs_w, mask=w_ok, other=0.0)
        b = tl.load(
            bt_ptr + index * stride_bc + offs_w[:, None] * stride_bw + offs_n[None, :],
            mask=w_ok[:, None] & n_ok[None, :],
            other=0,
        ).to(tl.float32)
        acc += tl.sum(s[:, None] * b, axis=0)
    add_rounded(out_ptr + token * stride_o + offs_n, acc, n_ok)


def shrink(
    x: torch.Tensor,  # [T, in], last dim contiguous
    a: torch.Tensor,  # [C, R, in] contiguous (R = M * W)
    row_scale: torch.Tensor,  # [C, R] float32 contiguous
    out: torch.Tensor,  # [T, R] float32: the segments' rows are written
    starts: torch.Tensor,  # [S] int64
    lens: torch.Tensor | None,  # [S] int64; None: every segment is one token (BGMV)
    index: torch.Tensor,  # [S] int64
    longest: int,  # the longest segment's tokens
) -> None:
    segments, rank_rows, in_features = starts.shape[0], a.shape[1], a.shape[2]
    if segments == 0:
        return
    args = (in_features, rank_rows, x.stride(0), a.stride(0), a.stride(1), row_scale.stride(0))
    parts = triton.cdiv(rank_rows, BLOCK_R)
    if lens is None:
        grid = (segments, parts)
        _bgmv_shrink[grid](
            x, a, row_scale, out, starts, index, *args, out.stride(0),
            BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
        )  # fmt: skip
        return
    grid3 = (segments, triton.cdiv(longest, BLOCK_T), parts)
    _sgmv_shrink[grid3](
        x, a, row_scale, out, starts, lens, index, *args, out.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
    )  # fmt: skip


def expand(
    shrunk: torch.Tensor,  # [T, M*W] float32
    col0: int,  # this member's first column in `shrunk`
    bt: torch.Tensor,  # [C, W, out] contiguous
    out: torch.Tensor,  # [T, out], last dim contiguous: deltas added in place
    starts: torch.Tensor,
    lens: torch.Tensor | None,
    index: torch.Tensor,
    longest: int,
) -> None:
    segments, width, out_features = starts.shape[0], bt.shape[1], bt.shape[2]
    if segments == 0:
        return
    args = (col0, width, out_features, shrunk.stride(0), bt.stride(0), bt.stride(1), out.stride(0))
    parts = triton.cdiv(out_features, BLOCK_N)
    if lens is None:
        _bgmv_expand[(segments, parts)](
            shrunk, bt, out, starts, index, *args, BLOCK_W=BLOCK_W, BLOCK_N=BLOCK_N
        )
        return
    grid = (segments, triton.cdiv(longest, BLOCK_T), parts)
    _sgmv_expand[grid](
        shrunk, bt, out, starts, lens, index, *args,
        BLOCK_T=BLOCK_T, BLOCK_W=BLOCK_W, BLOCK_N=BLOCK_N,
    )  # fmt: skip
