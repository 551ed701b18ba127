"""Multi-LoRA linear layers: every row of a batch may use a different adapter.

Each adapted base layer keeps its adapters in preallocated stacked slot tensors
(``lora_a`` [slots, R, in], ``lora_bt`` [slots, R, out], as vLLM's
``lora_a_stacked``/``lora_b_stacked``); slot 0 stays zero and means "base model only".
A batch carries one slot index per row, and each layer computes

    y = W4(x) + scaling[slot] * (x @ A[slot].T) @ B[slot].T

without merging anything into the shared 4-bit weights. Two shapes of work:

* decode (one token per row): a BGMV-style gather-reduce that reads each row's slot in
  place. torch.compile fuses the gather into the reduction, so no per-token copy of the
  adapter weights is made (that copy is what makes naive gather+bmm slow).
* prefill (many tokens per row): a segmented batched matmul, one segment per row; the
  gathered weights are amortised over the row's tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loramux.server.adapters import LinearShape, ModuleWeights

log = logging.getLogger(__name__)

RANK_ALIGN = 8  # stacked rank width grows in steps of this
# Up to this many distinct slots in a batch, one dense matmul over just those adapters
# beats the per-token kernel (the FLOPs wasted on other rows' blocks are tiny).
DENSE_MAX_ADAPTERS = 4


@dataclass
class LoraBatchMetadata:
    """Adapter routing for one forward pass (cf. LoRAX's AdapterBatchMetadata)."""

    row_slots: torch.Tensor  # [rows] int64: device slot per batch row, 0 = base model only
    slots_in_batch: frozenset[int]  # distinct non-zero slots present (skip layers they don't touch)
    tokens_per_row: int  # 1 for decode, T for a (right-padded) prefill
    unique_slots: torch.Tensor  # [U] int64: the distinct slots of row_slots (0 included if present)
    token_onehot: torch.Tensor | None  # [rows * tokens_per_row, U] float32; None: U too large
    unique_key: tuple[int, ...] = ()  # the same distinct slots, sorted, as a hashable key

    @property
    def single_slot(self) -> int | None:
        """The one adapter every row uses, if so (plain GEMMs, no masks)."""
        return self.unique_key[0] if len(self.unique_key) == 1 else None

    @classmethod
    def build(
        cls, slots: list[int], tokens_per_row: int, device: torch.device
    ) -> LoraBatchMetadata:
        row_slots = torch.tensor(slots, dtype=torch.long, device=device)
        unique, groups = torch.unique(row_slots, return_inverse=True)
        onehot = None
        if unique.shape[0] <= DENSE_MAX_ADAPTERS:
            token_groups = groups.repeat_interleave(tokens_per_row)
            onehot = torch.nn.functional.one_hot(token_groups, unique.shape[0]).float()
        return cls(
            row_slots=row_slots,
            slots_in_batch=frozenset(s for s in slots if s),
            tokens_per_row=tokens_per_row,
            unique_slots=unique,
            token_onehot=onehot,
            unique_key=tuple(sorted(set(slots))),
        )


@dataclass
class LoraContext:
    """Shared by every MultiLoraLinear: the engine sets `batch` before each forward."""

    batch: LoraBatchMetadata | None = None
    decode_kernel: Callable[..., torch.Tensor] | None = None  # bgmv_int8 when `quantized`
    quantized: bool = False  # int8 slots with per-row scales (--lora-slot-dtype int8)
    stats: dict[str, int] = field(default_factory=dict)


def bgmv_reference(
    x: torch.Tensor,  # [tokens, in]
    lora_a: torch.Tensor,  # [slots, R, in]
    lora_bt: torch.Tensor,  # [slots, R, out]
    scalings: torch.Tensor,  # [slots] float32
    token_slots: torch.Tensor,  # [tokens] int64
) -> torch.Tensor:  # [tokens, out], x.dtype
    """Per-token LoRA delta written as gather-reduce; compiled, the gathers never materialise."""
    shrunk = (lora_a[token_slots].float() * x[:, None, :].float()).sum(-1)
    shrunk = shrunk * scalings[token_slots][:, None]
    return (lora_bt[token_slots].float() * shrunk[:, :, None]).sum(1).to(x.dtype)


def bgmv_int8(
    x: torch.Tensor,  # [tokens, in]
    lora_a: torch.Tensor,  # [slots, R, in] int8
    a_scale: torch.Tensor,  # [slots, R] float32: A row r = lora_a[., r] * a_scale[., r]
    lora_bt: torch.Tensor,  # [slots, R, out] int8
    bt_scale: torch.Tensor,  # [slots, R] float32
    scalings: torch.Tensor,  # [slots] float32
    token_slots: torch.Tensor,  # [tokens] int64
) -> torch.Tensor:  # [tokens, out], x.dtype
    """`bgmv_reference` on int8 slots: half the bytes read; every scale folds into [tokens, R]."""
    shrunk = (lora_a[token_slots].float() * x[:, None, :].float()).sum(-1)
    scale = a_scale[token_slots] * bt_scale[token_slots] * scalings[token_slots][:, None]
    shrunk = shrunk * scale
    return (lora_bt[token_slots].float() * shrunk[:, :, None]).sum(1).to(x.dtype)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 [R, n], float32 scale [R]); an all-zero row scales by 1."""
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def segmented_lora(
    x: torch.Tensor,  # [rows, T, in]
    a: torch.Tensor,  # [rows, R, in] float32: each row's own A (gathered, dequantised)
    bt: torch.Tensor,  # [rows, R, out] float32
    row_scalings: torch.Tensor,  # [rows] float32
) -> torch.Tensor:  # [rows, T, out]
    """One batched matmul per projection, a segment per row (prefill)."""
    shrunk = torch.bmm(x.float(), a.transpose(1, 2)) * row_scalings[:, None, None]
    return torch.bmm(shrunk, bt).to(x.dtype)


def make_decode_kernel(mode: str, quantized: bool = False) -> Callable[..., torch.Tensor]:
    """`compiled` fuses the gathers (needs a C++ compiler on CPU, Triton on CUDA)."""
    kernel = bgmv_int8 if quantized else bgmv_reference
    if mode == "eager":
        return kernel
    return torch.compile(kernel, dynamic=True)  # type: ignore[return-value]


def warm_decode_kernel(
    kernel: Callable[..., torch.Tensor],
    in_features: int,
    out_features: int,
    slots: int,
    device: torch.device,
    quantized: bool,
) -> None:
    """Call the kernel once per batch-size class on zeros, so it is compiled before use."""
    weight_dtype = torch.int8 if quantized else torch.bfloat16
    a = torch.zeros(slots, RANK_ALIGN, in_features, dtype=weight_dtype, device=device)
    bt = torch.zeros(slots, RANK_ALIGN, out_features, dtype=weight_dtype, device=device)
    scale = torch.zeros(slots, RANK_ALIGN, device=device)
    scalings = torch.zeros(slots, device=device)
    for rows in (1, 2):
        x = torch.zeros(rows, in_features, dtype=torch.bfloat16, device=device)
        token_slots = torch.zeros(rows, dtype=torch.long, device=device)
        with torch.inference_mode():
            if quantized:
                kernel(x, a, scale, bt, scale, scalings, token_slots)
            else:
                kernel(x, a, bt, scalings, token_slots)


class MultiLoraLinear(nn.Module):
    """A frozen base linear layer plus stacked adapter slots, routed per batch row."""

    lora_a: torch.Tensor  # [slots, R, in_features] bf16, or int8 when quantized
    lora_bt: torch.Tensor  # [slots, R, out_features] (B transposed: rows read contiguously)
    a_scale: torch.Tensor  # [slots, R] float32 row scales of lora_a (quantized only, else [0])
    bt_scale: torch.Tensor  # [slots, R] float32 row scales of lora_bt (quantized only, else [0])
    scalings: torch.Tensor  # [slots] float32

    def __init__(
        self,
        base: nn.Module,
        name: str,
        shape: LinearShape,
        num_slots: int,
        context: LoraContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.shape = shape
        self.context = context
        self.quantized = context.quantized
        if self.quantized:
            dtype = torch.int8
        self.rank_width = 0
        self.occupied: set[int] = set()  # slots holding weights for this layer
        self.scaling_values = [0.0] * num_slots  # host copy of `scalings` (no device sync)
        # float32 gathers of the few slots a batch uses, reused while the batch keeps them.
        self._gathered: tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = (
            None
        )
        # Buffers, not parameters: never trained, never saved with the model.
        self.register_buffer(
            "lora_a",
            torch.zeros(num_slots, 0, shape.in_features, dtype=dtype, device=device),
            persistent=False,
        )
        self.register_buffer(
            "lora_bt",
            torch.zeros(num_slots, 0, shape.out_features, dtype=dtype, device=device),
            persistent=False,
        )
        self.register_buffer(
            "scalings", torch.zeros(num_slots, dtype=torch.float32, device=device), persistent=False
        )
        for name in ("a_scale", "bt_scale"):
            self.register_buffer(
                name,
                torch.zeros(num_slots if self.quantized else 0, 0, device=device),
                persistent=False,
            )

    def grow_rank(self, width: int) -> None:
        """Widen the stacked rank dimension (zero-padded); slots keep their weights."""
        if width <= self.rank_width:
            return
        slots = self.lora_a.shape[0]
        a = torch.zeros(
            slots, width, self.shape.in_features, dtype=self.lora_a.dtype, device=self.lora_a.device
        )
        bt = torch.zeros(
            slots,
            width,
            self.shape.out_features,
            dtype=self.lora_bt.dtype,
            device=self.lora_bt.device,
        )
        a[:, : self.rank_width] = self.lora_a
        bt[:, : self.rank_width] = self.lora_bt
        self.lora_a, self.lora_bt = a, bt
        if self.quantized:
            for name in ("a_scale", "bt_scale"):
                old = getattr(self, name)
                wider = torch.zeros(slots, width, dtype=old.dtype, device=old.device)
                wider[:, : self.rank_width] = old
                setattr(self, name, wider)
        self.rank_width = width
        self._gathered = None

    def write_slot(self, slot: int, weights: ModuleWeights | None) -> None:
        """Copy one adapter's matrices into `slot` (None clears it)."""
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        if self.quantized:
            self.a_scale[slot].zero_()
            self.bt_scale[slot].zero_()
        self.scalings[slot] = 0.0
        self.scaling_values[slot] = 0.0
        self.occupied.discard(slot)
        if self._gathered is not None and slot in self._gathered[0]:
            self._gathered = None
        if weights is None:
            return
        rank = weights.lora_a.shape[0]
        if self.quantized:
            for target, scale, weight in (
                (self.lora_a, self.a_scale, weights.lora_a),
                (self.lora_bt, self.bt_scale, weights.lora_b.t()),
            ):
                q, row_scale = quantize_rows(weight)
                target[slot, :rank].copy_(q, non_blocking=True)
                scale[slot, :rank].copy_(row_scale, non_blocking=True)
        else:
            self.lora_a[slot, :rank].copy_(weights.lora_a, non_blocking=True)
            self.lora_bt[slot, :rank].copy_(weights.lora_b.t(), non_blocking=True)
        self.scalings[slot] = weights.scaling
        self.scaling_values[slot] = weights.scaling
        self.occupied.add(slot)

    def _slot_weights(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 A [n, R, in] and B^T [n, R, out] of the slots in `index` [n] (dequantised)."""
        a = self.lora_a.index_select(0, index).float()
        bt = self.lora_bt.index_select(0, index).float()
        if self.quantized:
            a.mul_(self.a_scale.index_select(0, index)[:, :, None])
            bt.mul_(self.bt_scale.index_select(0, index)[:, :, None])
        return a, bt

    def _gather(self, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 (A^T [in, U*R], B^T [U*R, out], scalings [U]) of the slots in `key`."""
        if self._gathered is None or self._gathered[0] != key:
            index = torch.tensor(key, dtype=torch.long, device=self.lora_a.device)
            rows = len(key) * self.rank_width
            a, bt = self._slot_weights(index)
            a_t = a.reshape(rows, -1).t().contiguous()
            self._gathered = (key, a_t, bt.reshape(rows, -1), self.scalings.index_select(0, index))
        return self._gathered[1], self._gathered[2], self._gathered[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = self.context.batch
        if batch is None or not (self.occupied & batch.slots_in_batch):
            return out
        rows = batch.row_slots.shape[0]
        if batch.token_onehot is not None:
            # Few distinct adapters (the batch-1 case among them): two float32 GEMMs over
            # just their weights; a one-hot mask keeps each token's own block. float32
            # because small bf16 GEMMs carry ~10 us of fixed cost each on CPU (measured).
            a_t, bt, scales = self._gather(batch.unique_key)
            flat = x.reshape(-1, self.shape.in_features).float()
            shrunk = torch.mm(flat, a_t)  # [tokens, U * R]
            if batch.single_slot is None:
                width = self.rank_width
                weight = (batch.token_onehot * scales[None, :])[:, :, None]  # [tokens, U, 1]
                shrunk = (shrunk.view(-1, len(batch.unique_key), width) * weight).view(
                    flat.shape[0], -1
                )
                delta = torch.mm(shrunk, bt)
            else:
                delta = torch.mm(shrunk, bt).mul_(self.scaling_values[batch.single_slot])
            # Rounded to the output dtype before the add, as PEFT's 4-bit LoRA layers do.
            return out.add_(delta.to(out.dtype).view(out.shape))
        kernel = self.context.decode_kernel
        if batch.tokens_per_row == 1 and kernel is not None:
            flat = x.reshape(rows, self.shape.in_features)
            if self.quantized:
                delta = kernel(
                    flat,
                    self.lora_a,
                    self.a_scale,
                    self.lora_bt,
                    self.bt_scale,
                    self.scalings,
                    batch.row_slots,
                )
            else:
                delta = kernel(flat, self.lora_a, self.lora_bt, self.scalings, batch.row_slots)
        else:
            grouped = x.reshape(rows, -1, self.shape.in_features)
            a, bt = self._slot_weights(batch.row_slots)
            delta = segmented_lora(grouped, a, bt, self.scalings.index_select(0, batch.row_slots))
        return out + delta.reshape(out.shape)


def _is_linear(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb

        linear_types: tuple[type, ...] = (nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        linear_types = (nn.Linear,)
    return isinstance(module, linear_types)


def base_linear_shapes(model: Any) -> dict[str, LinearShape]:
    """The linear layers adapters may target: all but the output head.

    On a model already wrapped, reports the wrapped layers (not their inner base layers).
    """
    output = model.get_output_embeddings()
    shapes: dict[str, LinearShape] = {}
    inside_wrapper: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside_wrapper and name.startswith(inside_wrapper):
            continue
        if isinstance(module, MultiLoraLinear):
            shapes[name] = module.shape
            inside_wrapper = (*inside_wrapper, name + ".")
        elif _is_linear(module) and module is not output and not name.endswith("lm_head"):
            shapes[name] = LinearShape(module.in_features, module.out_features)
    return shapes


def wrap_linear_layers(
    model: Any, num_slots: int, context: LoraContext, dtype: torch.dtype, device: torch.device
) -> dict[str, MultiLoraLinear]:
    """Replace every adaptable linear layer with a MultiLoraLinear, once, at start."""
    wrapped: dict[str, MultiLoraLinear] = {}
    for name, shape in base_linear_shapes(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MultiLoraLinear(
            getattr(parent, child), name, shape, num_slots, context, dtype, device
        )
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def iter_lora_layers(model: nn.Module) -> Iterator[MultiLoraLinear]:
    for module in model.modules():
        if isinstance(module, MultiLoraLinear):
            yield module
