"""Where an adapter's weights live on the device, and in which number format.

Two nouns:

* `SlotFormat`: how a weight matrix is stored in a slot (bf16 as given, or int8 with a
  float32 scale per rank row). Whatever the format, a stored rank row times its float32
  row factor is the weight; the layers fold every factor of a rank row (quantisation
  scales, the LoRA scaling, a request's weight) into one `row_scale`, so the compute
  paths are the same for every format.
* `SlotTable`: the placement of device slots into *rank classes*. An adapter of rank r
  sits in the stack of width `align(r)` (a multiple of RANK_ALIGN) at an index of its
  own, so a batch mixing ranks 8 and 64 reads 8 rank rows for the first and 64 for the
  second instead of padding everything to the widest (S-LoRA and Punica keep
  heterogeneous ranks unpadded for the same reason). The table is shared by every
  layer of the model; the adapter store alone changes it, on the engine thread.
  A DoRA adapter's slot also gets a row of the layers' DoRA scale stacks (`dora_index`):
  row 0 is all ones (every other slot), so only DoRA adapters take that memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

RANK_ALIGN = 8  # rank classes are multiples of this
MIN_CLASS_CAPACITY = 2  # a new rank class stack has room for this many (then doubles)


def align_rank(rank: int) -> int:
    """The rank class (stack width) of an adapter of this rank."""
    return max(RANK_ALIGN, -(-rank // RANK_ALIGN) * RANK_ALIGN)


class SlotFormat(ABC):
    """How one weight matrix [rows, n] is stored in a slot."""

    name: str
    dtype: torch.dtype

    @abstractmethod
    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(stored rows [rows, n] in `dtype`, float32 factor per row [rows], None: all 1)."""


class Bf16Format(SlotFormat):
    """The adapter's bf16 weights as they are (the default: exact)."""

    name = "bf16"
    dtype = torch.bfloat16

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight.to(self.dtype), None


class Int8Format(SlotFormat):
    """Symmetric int8 per rank row (absmax / 127): half the device bytes of bf16."""

    name = "int8"
    dtype = torch.int8

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return quantize_rows(weight)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 [R, n], float32 scale [R]); an all-zero row scales by 1."""
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


SLOT_FORMATS: dict[str, type[SlotFormat]] = {"bf16": Bf16Format, "int8": Int8Format}


def slot_format(name: str) -> SlotFormat:
    try:
        return SLOT_FORMATS[name]()
    except KeyError:
        raise ValueError(f"unknown slot dtype {name!r}: one of {', '.join(SLOT_FORMATS)}") from None


@dataclass(frozen=True)
class Placement:
    """Where a device slot's weights sit: the rank class stack and the index inside it."""

    width: int  # rank rows of the class (a multiple of RANK_ALIGN)
    index: int  # position in that class's stack


class SlotTable:
    """Device slot -> (rank class, index). Slot 0 is never placed: it means "no adapter"."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots  # slot ids [0, num_slots)
        self._where: dict[int, Placement] = {}
        self._free: dict[int, list[int]] = {}  # width -> free indices below its capacity
        self._capacity: dict[int, int] = {}  # width -> stack length the layers must hold
        self._dora: dict[int, int] = {}  # DoRA slot -> its row of the DoRA scale stacks
        self._dora_free: list[int] = []  # free rows below dora_capacity (row 0: ones)
        self.dora_capacity = 0  # rows 1..dora_capacity the layers' DoRA stacks must hold
        self.version = 0  # bumped on every change (layers resize lazily when it moves)

    def place(self, slot: int, rank: int, dora: bool = False) -> Placement:
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot {slot} outside [1, {self.num_slots})")
        if slot in self._where:
            raise ValueError(f"slot {slot} is already placed")
        width = align_rank(rank)
        free = self._free.setdefault(width, [])
        if not free:
            old = self._capacity.get(width, 0)
            new = min(max(MIN_CLASS_CAPACITY, 2 * old), self.num_slots - 1)
            free.extend(range(new - 1, old - 1, -1))
            self._capacity[width] = new
        placement = Placement(width, free.pop())
        self._where[slot] = placement
        if dora:
            if not self._dora_free:
                old = self.dora_capacity
                self.dora_capacity = min(max(MIN_CLASS_CAPACITY, 2 * old), self.num_slots - 1)
                self._dora_free.extend(range(self.dora_capacity, old, -1))
            self._dora[slot] = self._dora_free.pop()
        self.version += 1
        return placement

    def dora_index(self, slot: int) -> int:
        """The slot's row of the DoRA scale stacks; 0 (all ones) for a slot without DoRA."""
        return self._dora.get(slot, 0)

    def remove(self, slot: int) -> None:
        placement = self._where.pop(slot, None)
        if placement is None:
            return
        row = self._dora.pop(slot, None)
        if row is not None:
            self._dora_free.append(row)
            if len(self._dora_free) == self.dora_capacity:  # no DoRA adapter left
                self._dora_free, self.dora_capacity = [], 0
        self._free[placement.width].append(placement.index)
        if len(self._free[placement.width]) == self._capacity[placement.width]:
            # The class is empty: the layers release its stacks.
            del self._free[placement.width], self._capacity[placement.width]
        self.version += 1

    def placement(self, slot: int) -> Placement | None:
        return self._where.get(slot)

    def capacities(self) -> dict[int, int]:
        """Rank class width -> stack length, for every class in use."""
        return dict(self._capacity)
