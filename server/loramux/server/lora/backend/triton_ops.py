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

Both are one operation, y[t, n] = sum_k in[t, k] * w[index, n, k] over a segment's
tokens, with the weights' layout given by strides (A is [n, k] row-major, Bt [k, n]) and
an epilogue: scale and store (shrink) or round and add (expand). It has two kernels, as
Punica, vLLM and SGLang do: `_sgmv` tiles a segment's tokens (BLOCK_T rows per program,
`tl.dot`), so a prompt's adapter weights are read once per tile of tokens; `_bgmv` takes
one token per program and reduces with `tl.sum`, no 16-row tile wasted on a decoding row.

The inputs and weights are widened to float32 (exactly: bf16 and int8 values are float32
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
BLOCK_N = 32  # outputs (rank rows of a shrink, features of an expand) per program
BLOCK_K = 32  # reduction steps (input features, rank rows) per iteration


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
def _epilogue(acc, y_ptr, rows, offs_n, ok, stride_y, scale_ptr, n_size, SHRINK: tl.constexpr):
    """Shrink: acc x row_scale stored as float32; expand: acc rounded, added in place."""
    where = y_ptr + rows * stride_y + offs_n
    if SHRINK:
        scale = tl.load(scale_ptr + offs_n, mask=offs_n < n_size, other=0.0)  # [1, N] or [N]
        tl.store(where, acc * scale, mask=ok)
    else:
        add_rounded(where, acc, ok)


@triton.jit
def _sgmv(
    in_ptr,  # [T, *] the tokens' inputs (x, or a member's columns of the shrunk s)
    w_ptr,  # [C, ...] the class stack: w[c, n, k] at c*stride_wc + n*stride_wn + k*stride_wk
    scale_ptr,  # [C, N] float32 row_scale (shrink only)
    y_ptr,  # [T, N]: float32 shrunk (shrink) or the base output (expand, added into)
    starts_ptr,  # [S] int64 contiguous
    lens_ptr,  # [S] int64
    index_ptr,  # [S] int64: the segment's adapter in the class stack
    n_size: tl.constexpr,
    k_size: tl.constexpr,
    stride_in,
    stride_wc,
    stride_wn,
    stride_wk,
    stride_sc,
    stride_y,
    SHRINK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
        offs_n = part * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok = offs_t < length
        n_ok = offs_n < n_size
        w_base = w_ptr + index * stride_wc + offs_n[None, :] * stride_wn
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_size, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_size
            xs = tl.load(
                in_ptr + (start + offs_t)[:, None] * stride_in + offs_k[None, :],
                mask=t_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_base + offs_k[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0
            )  # [K, N]
            acc += tl.dot(xs.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        _epilogue(
            acc,
            y_ptr,
            (start + offs_t)[:, None],
            offs_n[None, :],
            t_ok[:, None] & n_ok[None, :],
            stride_y,
            scale_ptr + index * stride_sc,
            n_size,
            SHRINK,
        )


@triton.jit
def _bgmv(
    in_ptr,
    w_ptr,
    scale_ptr,
    y_ptr,
    starts_ptr,  # [S] int64: each one-token segment's token
    index_ptr,
    n_size: tl.constexpr,
    k_size: tl.constexpr,
    stride_in,
    stride_wc,
    stride_wn,
    stride_wk,
    stride_sc,
    stride_y,
    SHRINK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    part = tl.program_id(1)
    token = tl.load(starts_ptr + seg)
    index = tl.load(index_ptr + seg)
    offs_n = part * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_size
    w_base = w_ptr + index * stride_wc + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_size
        xs = tl.load(in_ptr + token * stride_in + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(
            w_base + offs_k[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0
        ).to(tl.float32)  # [K, N]
        acc += tl.sum(xs[:, None] * w, axis=0)
    scale = scale_ptr + index * stride_sc
    _epilogue(acc, y_ptr, token, offs_n, n_ok, stride_y, scale, n_size, SHRINK)


def _launch(
    inputs: torch.Tensor,  # [T, k] (a view: the member's columns for an expand)
    weights: torch.Tensor,  # [C, ...]
    strides: tuple[int, int],  # (stride of n, stride of k) in `weights`
    sizes: tuple[int, int],  # (n, k)
    scale: torch.Tensor | None,  # [C, n] float32 for a shrink; None: expand (add into y)
    y: torch.Tensor,  # [T, n]
    starts: torch.Tensor,
    lens: torch.Tensor | None,  # None: one-token segments (BGMV)
    index: torch.Tensor,
    longest: int,
) -> None:
    segments = starts.shape[0]
    if segments == 0:
        return
    for tensor in (starts, index, *(() if lens is None else (lens,))):
        assert tensor.is_contiguous() and tensor.dtype == torch.int64
    assert inputs.stride(1) == 1 and y.stride(1) == 1
    shrink = scale is not None
    scale_arg = scale if scale is not None else y  # unread by an expand
    args = (
        inputs, weights, scale_arg, y, starts, *(() if lens is None else (lens,)), index,
        sizes[0], sizes[1], inputs.stride(0), weights.stride(0), *strides,
        scale.stride(0) if scale is not None else 0, y.stride(0),
    )  # fmt: skip
    parts = triton.cdiv(sizes[0], BLOCK_N)
    if lens is None:
        _bgmv[(segments, parts)](*args, SHRINK=shrink, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        return
    grid = (segments, triton.cdiv(longest, BLOCK_T), parts)
    _sgmv[grid](*args, SHRINK=shrink, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


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
    sizes = (a.shape[1], a.shape[2])
    _launch(x, a, (a.stride(1), a.stride(2)), sizes, row_scale, out, starts, lens, index, longest)


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
    width = bt.shape[1]
    inputs = shrunk[:, col0 : col0 + width]
    sizes = (bt.shape[2], width)
    _launch(
        inputs, bt, (bt.stride(2), bt.stride(1)), sizes, None, out, starts, lens, index, longest
    )
