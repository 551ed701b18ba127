"""A row-slotted KV cache for continuous batching on top of Hugging Face models.

Each running request owns one row of preallocated per-layer tensors
[rows, kv_heads, capacity, head_dim]; its tokens sit left-aligned at columns
[0, length). Decode writes each row's new key/value at that row's own length, so rows
of different lengths share one forward pass with no re-padding, and joining or leaving
the batch copies only the moving row. Active rows are kept contiguous ([0, n)).

The model sees this object as its `cache`: HF attention calls `update()` per layer and
attends over what it returns, masked by the 4-D mask the engine builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepLayout:
    """Where this forward pass reads and writes (set by the engine before each forward)."""

    row_start: int  # first cache row of the batch
    rows: int
    write_positions: torch.Tensor | None  # [rows] int64 column per row (decode); None: prefill
    kv_length: int  # columns attended to (decode: max length + 1; prefill: T)


class SlotKVCache:
    """Per-layer K/V storage indexed by batch row; grows its column capacity on demand."""

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_capacity: int = 256,
    ) -> None:
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.initial_capacity = initial_capacity
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer [max_rows, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self.layout: StepLayout | None = None

    # -- memory --
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def ensure_capacity(self, columns: int) -> None:
        """Make room for `columns` tokens per row (doubling, so growth is amortised)."""
        if columns <= self.capacity:
            return
        new_capacity = max(self.initial_capacity, self.capacity * 2 if self.capacity else 0)
        while new_capacity < columns:
            new_capacity *= 2
        shape = (self.max_rows, self.kv_heads, new_capacity, self.head_dim)
        grown_k, grown_v = [], []
        for layer in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.capacity:
                k[:, :, : self.capacity] = self.keys[layer]
                v[:, :, : self.capacity] = self.values[layer]
            grown_k.append(k)
            grown_v.append(v)
        self.keys, self.values, self.capacity = grown_k, grown_v, new_capacity

    def release(self) -> None:
        """Free all storage (the batch is empty)."""
        self.keys, self.values, self.capacity = [], [], 0

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` tokens into row `dst` (to keep rows contiguous)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # -- the HF cache protocol --
    def update(
        self,
        key_states: torch.Tensor,  # [rows, kv_heads, T, head_dim]
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.layout
        assert layout is not None, "engine must set the step layout before a forward"
        rows = slice(layout.row_start, layout.row_start + layout.rows)
        k_store, v_store = self.keys[layer_idx], self.values[layer_idx]
        if layout.write_positions is None:  # prefill from an empty row
            length = key_states.shape[2]
            k_store[rows, :, :length] = key_states
            v_store[rows, :, :length] = value_states
            return key_states, value_states
        row_ids = torch.arange(layout.row_start, layout.row_start + layout.rows, device=self.device)
        k_store[row_ids, :, layout.write_positions] = key_states[:, :, 0]
        v_store[row_ids, :, layout.write_positions] = value_states[:, :, 0]
        return k_store[rows, :, : layout.kv_length], v_store[rows, :, : layout.kv_length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layout.kv_length if self.layout else 0

    @property
    def is_compileable(self) -> bool:
        return False
