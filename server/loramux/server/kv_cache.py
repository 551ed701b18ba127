"""A paged KV cache for continuous batching on top of Hugging Face models.

Keys and values live in one pool preallocated at start: per layer, `num_blocks` blocks
of `block_size` token positions. Which blocks a request holds is its *block table*
(kv_blocks.py decides that); a forward pass hands this object a `PagedLayout` saying
where each new token's key/value goes and which blocks each row reads.

The model sees this object as its `cache`: HF attention calls `update()` per layer. It
scatters the new keys/values into their blocks and returns, for each row, its own blocks
gathered into a [rows, kv_heads, kv_length, head_dim] tensor (one block-wise
`index_select` per layer, freed after the layer), which the layer's attention
(scaled_dot_product_attention) reads under the 4-D mask the runner builds. A row never
reads another row's blocks, and memory grows with the tokens held, not with the longest
row times the batch. Where the runner has a paged-attention kernel (paged_attention/, the
CPU's AVX-512 BF16 one), the rows it covers are not gathered: `update()` returns the pool
itself with their block tables (`PoolKV`, or the `GroupedKV` of a ragged pass with those
groups left empty) and the kernel reads their blocks in place. A fused CUDA kernel can
take the same place.

The pool's tensors are allocated zeroed (`torch.zeros`, which writes every page: the
whole pool is resident from start, 1,025 MB of RSS for the default 1 GiB measured). Zeros,
not `torch.empty`: padding columns are read (masked) and garbage could hold NaN, which a
-inf mask does not cancel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class PoolAttention(Protocol):
    """A kernel that attends straight from the block pool (paged_attention/: native.py,
    triton_ops.py)."""

    name: str  # as --attention-kernel names it

    def attend(
        self,
        query: torch.Tensor,  # [tokens, heads, head_dim]
        keys: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim]
        values: torch.Tensor,
        batch: KernelBatch,
        scale: float,
        out: torch.Tensor,  # [tokens, heads, head_dim]
        window: int | None = None,  # this layer's sliding window (keys > position - window)
        softcap: float | None = None,  # this layer's logit soft-capping: cap * tanh(s / cap)
    ) -> None: ...


@dataclass(frozen=True)
class KernelBatch:
    """Sequences whose attention a paged-attention kernel computes straight from the pool
    (paged_attention/), built once per pass by the runner and read by every layer."""

    sequences: torch.Tensor  # [n, 4] int64: first query token in the pass, query tokens,
    #                          position of the first query, offset of its table in `tables`
    tables: torch.Tensor  # [total blocks] int64: the sequences' block tables, concatenated
    kernel: PoolAttention
    # The most query tokens of a sequence, known on the host (a kernel's grid needs it;
    # reading it from `sequences` on CUDA would wait for the device in every layer)
    longest: int = 1


@dataclass
class PagedLayout:
    """Where one forward pass writes and reads (set by the runner before the forward)."""

    write_slots: torch.Tensor  # [new_tokens] int64: block * block_size + offset per valid token
    valid: torch.Tensor | None  # [rows, T] bool: real (not padding) new tokens; None: all are
    block_tables: torch.Tensor  # [rows, blocks] int64: each row's blocks in order (padded)
    kv_length: int  # columns attended to: the longest row's tokens after this pass
    kernel_batch: KernelBatch | None = None  # every row by the kernel (decode rows), no gather


@dataclass(frozen=True)
class SegmentGroup:
    """Rows of a ragged pass that attend alike: one gather, one mask, one attention call.

    The decoding rows (one new token each) form one group; each prefill chunk is a group
    of one row. Their new tokens are consecutive in the pass's flat token order.
    """

    tokens: slice  # the group's new tokens in the pass: rows x T of them, row-major
    rows: int
    block_tables: torch.Tensor  # [rows, blocks] int64: each row's blocks in order (padded)
    kv_length: int  # columns attended to: the group's longest row after this pass
    mask: torch.Tensor | None  # [rows, 1, T, kv_length] additive, causal; None: by the kernel


@dataclass
class RaggedLayout:
    """A pass whose tokens are flattened into one row (decode rows and prefill chunks
    together, one pass over the weights); attention runs per `SegmentGroup`."""

    write_slots: torch.Tensor  # [new_tokens] int64: block * block_size + offset per token
    groups: list[SegmentGroup]
    kernel_batch: KernelBatch | None = None  # the groups without a mask, by the kernel


@dataclass(frozen=True)
class GroupedKV:
    """What `update()` hands the attention in a ragged pass: each group's own keys (or
    values); engine attention (attention.py) reads it group by group."""

    groups: list[SegmentGroup]
    parts: list[torch.Tensor | None]  # per group [rows, kv_heads, kv_length, head_dim]; None:
    #                                   a group the kernel reads from `pool`
    pool: torch.Tensor | None = None  # [kv_heads, num_blocks, block_size, head_dim] this layer's
    kernel_batch: KernelBatch | None = None


@dataclass(frozen=True)
class PoolKV:
    """What `update()` hands the attention when a kernel reads every row from the pool."""

    pool: torch.Tensor  # [kv_heads, num_blocks, block_size, head_dim] this layer's keys or values
    kernel_batch: KernelBatch


class PagedKVCache:
    """Per-layer key/value block pools and the HF cache protocol over them."""

    # Heads outermost, so that a row's gathered keys are [kv_heads, tokens, head_dim] blocks
    # with the head_dim rows contiguous, the layout SDPA's CPU kernel reads fastest.
    keys: list[torch.Tensor]  # per layer [kv_heads, num_blocks, block_size, head_dim]
    values: list[torch.Tensor]  # per layer [kv_heads, num_blocks, block_size, head_dim]

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        shape = (kv_heads, num_blocks, block_size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.layout: PagedLayout | RaggedLayout | None = None

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * element

    @property
    def nbytes(self) -> int:
        """The pool's size (reserved at start, whatever is in use)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # -- the HF cache protocol --
    def update(
        self,
        key_states: torch.Tensor,  # [rows, kv_heads, T, head_dim]
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[GroupedKV, GroupedKV] | tuple[PoolKV, PoolKV]:
        """Write the pass's new keys/values into their blocks; return what attention reads.

        A padded pass gets each row's blocks as [rows, kv_heads, kv_length, head_dim]; a
        ragged pass (rows = 1, its tokens flattened) gets a `GroupedKV` per tensor; a pass
        whose rows a kernel reads from the pool gets the pool itself (`PoolKV`).
        """
        layout = self.layout
        assert layout is not None, "the runner must set the layout before a forward"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        flat_shape = (self.kv_heads, -1, self.head_dim)
        new_k = key_states.transpose(0, 1)  # [kv_heads, rows, T, head_dim]
        new_v = value_states.transpose(0, 1)
        if isinstance(layout, RaggedLayout) or layout.valid is None:
            new_k, new_v = new_k.reshape(flat_shape), new_v.reshape(flat_shape)
        else:
            new_k, new_v = new_k[:, layout.valid], new_v[:, layout.valid]
        keys.view(flat_shape).index_copy_(1, layout.write_slots, new_k.to(self.dtype))
        values.view(flat_shape).index_copy_(1, layout.write_slots, new_v.to(self.dtype))
        if isinstance(layout, RaggedLayout):
            return self._grouped(keys, layout), self._grouped(values, layout)
        if layout.kernel_batch is not None:
            batch = layout.kernel_batch
            return PoolKV(keys, batch), PoolKV(values, batch)
        return (
            self._rows(keys, layout.block_tables, layout.kv_length),
            self._rows(values, layout.block_tables, layout.kv_length),
        )

    def _grouped(self, pool: torch.Tensor, layout: RaggedLayout) -> GroupedKV:
        parts = [
            None if g.mask is None else self._rows(pool, g.block_tables, g.kv_length)
            for g in layout.groups
        ]
        return GroupedKV(layout.groups, parts, pool, layout.kernel_batch)

    def _rows(
        self,
        pool: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim]
        tables: torch.Tensor,  # [rows, blocks] int64
        length: int,
    ) -> torch.Tensor:  # [rows, kv_heads, length, head_dim]
        """Each row's first `length` positions, gathered from its blocks."""
        rows, blocks = tables.shape
        gathered = (self.kv_heads, rows, blocks * self.block_size, self.head_dim)
        return self._gather(pool, tables).view(gathered).transpose(0, 1)[:, :, :length]

    def _gather(
        self,
        pool: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim]
        tables: torch.Tensor,  # [rows, blocks] int64
    ) -> torch.Tensor:  # [kv_heads, rows * blocks, block_size * head_dim]
        """Each row's blocks, in order: one contiguous block_size x head_dim copy per block.

        `index_select` over a [kv_heads, num_blocks, block_size * head_dim] view copies whole
        blocks (2 KiB runs on SmolLM2); advanced indexing (`pool[:, tables]`) computed an
        offset per element instead and took 6x as long (412 vs 69 us for 32 rows x 6 blocks
        on one thread), 60 times per decode step on SmolLM2.
        """
        flat = pool.view(self.kv_heads, self.num_blocks, self.block_size * self.head_dim)
        return flat.index_select(1, tables.reshape(-1))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly (position_ids and the 4-D mask)

    @property
    def is_compileable(self) -> bool:
        return False
