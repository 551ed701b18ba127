"""Multi-LoRA linear layers: every row of a batch may use a different adapter.

Each adapted base layer keeps its adapters in preallocated stacked slot tensors (as
vLLM's ``lora_a_stacked``/``lora_b_stacked``), one stack per rank class
(`slots.SlotTable`); a batch carries one slot per row and each layer computes

    y = W4(x) + ((x @ A[slot].T) * row_scale[slot]) @ B[slot].T

without merging anything into the shared 4-bit weights. `row_scale` holds, per rank row,
the LoRA scaling times the slot format's factors (and a request's weight, for composed
adapters). A DoRA adapter's slot also holds g, PEFT's magnitude over the adapted weight's
norm per output channel (`dora.py`), and its rows get `base + (g - 1) * (base - bias) + g *
delta` instead; a batch without a DoRA slot never touches any of it.

Projections that read the same input (q/k/v of an attention block, gate/up of an MLP)
form one `LoraGroup`: their A matrices are stacked along the rank, so one shrink serves
all of them and one backend call computes every member's delta; the first member called
computes them, the others take theirs. The layers own the tensors and the routing; the
backend (`backend/`) does the arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loramux.server.adapters import LinearShape, ModuleWeights
from loramux.server.lora.metadata import DenseRoute, LoraBatchMetadata, LoraContext
from loramux.server.lora.slots import Placement

log = logging.getLogger(__name__)

# Sibling projections that read the same input tensor in the HF decoders we serve
# (Llama, Mistral, Qwen2, ...): their LoRA shrinks are fused.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
PEFT_WEIGHTS_SLOTS = 4  # slots whose float32 weights a group keeps for prompt chunks


@dataclass
class ClassStack:
    """One rank class's slots for every member of a group."""

    a: torch.Tensor  # [C, M * W, in] slot format dtype: member m's A at rows [m*W, (m+1)*W)
    row_scale: torch.Tensor  # [C, M * W] float32: scaling x format factors per rank row
    bts: tuple[torch.Tensor, ...]  # M x [C, W, out_m]: B transposed (rank rows contiguous)

    @property
    def nbytes(self) -> int:
        tensors = (self.a, self.row_scale, *self.bts)
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class DenseWeights:
    """float32 weights of the few slots a batch uses (dense path), reused while it keeps them."""

    key: tuple[int, ...]
    a_t: torch.Tensor  # [in, K] A^T of every (member, slot), member-major, row_scale folded in
    bts: tuple[torch.Tensor, ...]  # M x [K_m, out_m]
    offsets: tuple[int, ...]  # member m's columns of a_t: [offsets[m], offsets[m + 1])
    column_slot: torch.Tensor  # [K] int64: which of `key` each column belongs to


class LoraGroup:
    """The adapter slots of one or more projections that share their input."""

    def __init__(
        self, in_features: int, outs: list[int], context: LoraContext, device: torch.device
    ) -> None:
        self.in_features = in_features
        self.outs = outs  # out_features per member
        self.context = context
        self.device = device
        self.stacks: dict[int, ClassStack] = {}  # rank class width -> stack
        self.ranks: list[dict[int, int]] = [{} for _ in outs]  # member -> slot -> real rank
        # member -> slot -> the LoRA scaling when one factor scales every rank row (a plain
        # adapter in bf16 slots: PEFT's `scaling`), else absent (see `row_scale`)
        self.scalings: list[dict[int, float]] = [{} for _ in outs]
        self.occupied: set[int] = set()  # slots holding weights for any member
        # member -> [table.dora_capacity + 1, out_m] float32: DoRA's g per stack row (row 0,
        # every slot without DoRA, all ones); empty while no DoRA adapter is placed
        self.dora: tuple[torch.Tensor, ...] = ()
        self.dora_slots: list[set[int]] = [set() for _ in outs]  # member -> slots with a g
        self._version = -1  # the SlotTable version the stacks were fitted to
        self._dense: DenseWeights | None = None
        # slot -> per member (A [r, in], B [out, r]) in float32 or None, as PEFT holds them
        # (prompt chunks, `peft_weights`); the last PEFT_WEIGHTS_SLOTS slots asked
        self._peft: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.kernel_plan: object | None = None  # the backend's view of the stacks (its own)
        self.bases: list[nn.Module] = []  # each member's frozen base layer, in member order
        # (input, batch, outputs, members not yet served) of the current fused computation
        self._pending: tuple[torch.Tensor, LoraBatchMetadata, list[torch.Tensor], set[int]] | None
        self._pending = None

    @property
    def members(self) -> int:
        return len(self.outs)

    @property
    def version(self) -> int:
        """The SlotTable version the stacks were fitted to: they are replaced only with it."""
        return self._version

    def fit(self) -> None:
        """Resize the class stacks to the slot table (new classes, grown or emptied ones)."""
        table = self.context.table
        if table.version == self._version:
            return
        capacities = table.capacities()
        for width in [w for w in self.stacks if w not in capacities]:
            del self.stacks[width]  # an emptied class gives its memory back
        for width, capacity in capacities.items():
            old = self.stacks.get(width)
            if old is not None and old.a.shape[0] >= capacity:
                continue
            new = self._empty_stack(width, capacity)
            if old is not None:
                kept = old.a.shape[0]
                new.a[:kept] = old.a
                new.row_scale[:kept] = old.row_scale
                for target, source in zip(new.bts, old.bts, strict=True):
                    target[:kept] = source
            self.stacks[width] = new
        self._fit_dora(table.dora_capacity + 1 if table.dora_capacity else 0)
        self._version = table.version
        self._dense = None

    def needs_resize(self) -> bool:
        """Whether `fit` would replace or drop a stack, not only note the table's version
        (slot_copies.py: pending side-stream installs must be done before that)."""
        table = self.context.table
        if table.version == self._version:
            return False
        capacities = table.capacities()
        if any(width not in capacities for width in self.stacks):
            return True
        if any(
            width not in self.stacks or self.stacks[width].a.shape[0] < capacity
            for width, capacity in capacities.items()
        ):
            return True
        rows = table.dora_capacity + 1 if table.dora_capacity else 0
        return rows != (self.dora[0].shape[0] if self.dora else 0)

    def _fit_dora(self, rows: int) -> None:
        """Resize the DoRA stacks to `rows` (0: none), keeping the rows that stay."""
        have = self.dora[0].shape[0] if self.dora else 0
        if rows == have:
            return
        new = tuple(
            torch.ones(rows, out, dtype=torch.float32, device=self.device) for out in self.outs
        )
        kept = min(rows, have)
        for target, source in zip(new, self.dora, strict=False):
            target[:kept] = source[:kept]
        self.dora = new if rows else ()

    def _empty_stack(self, width: int, capacity: int) -> ClassStack:
        dtype = self.context.slot_format.dtype
        rows = self.members * width
        return ClassStack(
            a=torch.zeros(capacity, rows, self.in_features, dtype=dtype, device=self.device),
            row_scale=torch.zeros(capacity, rows, dtype=torch.float32, device=self.device),
            bts=tuple(
                torch.zeros(capacity, width, out, dtype=dtype, device=self.device)
                for out in self.outs
            ),
        )

    def write(self, member: int, slot: int, weights: ModuleWeights | None) -> None:
        """Copy one member's matrices of an adapter into `slot` (None zeroes them)."""
        self.install(slot, {member: weights})

    def install(self, slot: int, members: Mapping[int, ModuleWeights | None]) -> None:
        """Copy these members' matrices of an adapter into `slot` (None zeroes the member).

        An adapter install is one call per group (120 on SmolLM2, 128-through-32 slots
        cycles 32 adapters a batch), on the engine thread between steps, so it is kept to
        few torch calls: the group's matrices go in one `torch._foreach_copy_`, only the
        rows an adapter does not fill are zeroed, and a plain LoRA scaling is one fill per
        member. An install writes every row of every member at the slot's stack index (the
        weights or zeros): `forget` leaves the rows of a released slot as they are.
        """
        self.fit()
        self._dense = None
        self._pending = None
        self._peft.pop(slot, None)
        placement = self.context.table.placement(slot)
        fmt = self.context.slot_format
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for member, weights in members.items():
            self.ranks[member].pop(slot, None)
            self.scalings[member].pop(slot, None)
            rank = 0 if weights is None else weights.lora_a.shape[0]
            if placement is None:
                if weights is None:
                    continue
                raise ValueError(f"slot {slot} has no placement in the slot table")
            stack, width, i = self.stacks[placement.width], placement.width, placement.index
            if rank > width:
                raise ValueError(f"rank {rank} exceeds slot {slot}'s rank class {width}")
            start = member * width
            if rank < width:  # the rows past the adapter's rank (all of them when clearing)
                rows = slice(start + rank, start + width)
                stack.a[i, rows].zero_()
                stack.row_scale[i, rows].zero_()
                stack.bts[member][i, rank:].zero_()
            if weights is None:
                continue
            a, a_factor = fmt.encode(weights.lora_a)
            bt, bt_factor = fmt.encode(weights.lora_b.t())
            targets += (stack.a[i, start : start + rank], stack.bts[member][i, :rank])
            sources += (a, bt)
            row_scale = stack.row_scale[i, start : start + rank]
            if weights.row_scaling is None and a_factor is None and bt_factor is None:
                row_scale.fill_(weights.scaling)
                self.scalings[member][slot] = weights.scaling
            else:
                scaling = (
                    weights.row_scaling.float()
                    if weights.row_scaling is not None
                    else torch.full((rank,), weights.scaling, dtype=torch.float32)
                )
                ones = torch.ones(rank, dtype=torch.float32)
                a_part = ones if a_factor is None else a_factor
                bt_part = ones if bt_factor is None else bt_factor
                row_scale.copy_(a_part * bt_part * scaling)  # this order: bit for bit as before
            self.ranks[member][slot] = rank
        if targets:
            torch._foreach_copy_(targets, sources, non_blocking=True)
        self._install_dora(slot, members)
        if any(slot in ranks for ranks in self.ranks):
            self.occupied.add(slot)
        else:
            self.occupied.discard(slot)

    def _install_dora(self, slot: int, members: Mapping[int, ModuleWeights | None]) -> None:
        """Write each member's g into the slot's DoRA row (ones where it has none)."""
        row = self.context.table.dora_index(slot)
        for member, weights in members.items():
            scale = None if weights is None else weights.dora_scale
            if row:
                if scale is None:
                    self.dora[member][row].fill_(1.0)
                else:
                    self.dora[member][row].copy_(scale)
            if row and scale is not None:
                self.dora_slots[member].add(slot)
            else:
                self.dora_slots[member].discard(slot)

    def forget(self, slot: int) -> None:
        """Release `slot` from every member without touching the stacks (an eviction).

        Nothing reads a stack index no slot is placed at, and the next install there
        writes or zeroes all its rows; zeroing here took 1.6 ms per rank-16 eviction.
        """
        for ranks, scalings, dora in zip(self.ranks, self.scalings, self.dora_slots, strict=True):
            ranks.pop(slot, None)
            scalings.pop(slot, None)
            dora.discard(slot)
        self.occupied.discard(slot)
        self._dense = None
        self._pending = None
        self._peft.pop(slot, None)

    def peft_weights(
        self, slot: int, placement: Placement
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per member, `slot`'s A [r, in] and B [out, r] in float32 at its real rank, as
        PEFT's LoRA layer holds them (None: the adapter leaves the member alone).

        Kept for the last PEFT_WEIGHTS_SLOTS slots asked: a long prompt's chunks come back
        pass after pass with the same adapter (~20 MB per rank-16 all-linear adapter).
        """
        cached = self._peft.pop(slot, None)
        if cached is None:
            stack, i = self.stacks[placement.width], placement.index
            cached = []
            for member, out in enumerate(self.outs):
                rank = self.ranks[member].get(slot, 0)
                if rank == 0:
                    cached.append(None)
                    continue
                start = member * placement.width
                b = torch.empty(out, rank, device=self.device)
                b.copy_(stack.bts[member][i, :rank].t())
                cached.append((stack.a[i, start : start + rank].float(), b))
            while len(self._peft) >= PEFT_WEIGHTS_SLOTS:
                del self._peft[next(iter(self._peft))]
        self._peft[slot] = cached  # most recently asked last
        return cached

    def dense_weights(self, route: DenseRoute) -> DenseWeights:
        """float32 A^T (row_scale folded in) and B^T of `route.key`'s slots at their real ranks."""
        if self._dense is not None and self._dense.key == route.key:
            return self._dense
        a_rows: list[torch.Tensor] = []
        bts: list[torch.Tensor] = []
        offsets = [0]
        column_slot: list[int] = []
        for member in range(self.members):
            member_bts = []
            for u, (slot, placement) in enumerate(zip(route.key, route.placements, strict=True)):
                rank = self.ranks[member].get(slot, 0)
                if rank == 0:
                    continue
                stack, i = self.stacks[placement.width], placement.index
                start = member * placement.width
                scale = stack.row_scale[i, start : start + rank]
                a_rows.append(stack.a[i, start : start + rank].float() * scale[:, None])
                member_bts.append(stack.bts[member][i, :rank].float())
                column_slot.extend([u] * rank)
            bts.append(
                torch.cat(member_bts)
                if member_bts
                else torch.zeros(0, self.outs[member], device=self.device)
            )
            offsets.append(offsets[-1] + bts[-1].shape[0])
        a_t = (
            torch.cat(a_rows).t().contiguous()
            if a_rows
            else torch.zeros(self.in_features, 0, device=self.device)
        )
        self._dense = DenseWeights(
            key=route.key,
            a_t=a_t,
            bts=tuple(bts),
            offsets=tuple(offsets),
            column_slot=torch.tensor(column_slot, dtype=torch.long, device=self.device),
        )
        return self._dense

    def output(self, member: int, x: torch.Tensor, batch: LoraBatchMetadata) -> torch.Tensor:
        """This member's output, base layer plus LoRA delta, for input `x` [..., in].

        The first member asked computes every member's: each base layer on `x`, then one
        backend call adds all the deltas into those outputs in place; its siblings, called
        next on the same input (q/k/v, gate/up), take theirs. A member asked again, or for
        another input, starts a new computation.
        """
        pending = self._pending
        if not (
            pending is not None and pending[0] is x and pending[1] is batch and member in pending[3]
        ):
            outs = [base(x) for base in self.bases]
            flat = x.reshape(-1, self.in_features)
            if batch.dora_route is not None and any(
                not slots.isdisjoint(batch.slots_in_batch) for slots in self.dora_slots
            ):
                self._add_dora_deltas(flat, batch, outs)
            else:
                self.context.backend.add_deltas(self, flat, batch, outs)
            pending = (x, batch, outs, set(range(self.members)))
            self._pending = pending
        pending[3].discard(member)
        if not pending[3]:
            self._pending = None  # every member served: don't keep the input alive
        return pending[2][member]

    def _add_dora_deltas(
        self,
        x: torch.Tensor,  # [tokens, in]
        batch: LoraBatchMetadata,
        outs: list[torch.Tensor],  # M x [..., out_m]: the members' base outputs
    ) -> None:
        """Every member's output with DoRA applied to the rows of DoRA slots, as PEFT:
        `bf16(base + (g - 1) * (base - bias) + g * delta)` in float32, rounded once (PEFT's
        DoRA adds its float32 term to the bf16 base result, then casts). Rows without DoRA
        have g = 1 there, which leaves exactly `base + delta`, their plain result.
        """
        assert batch.dora_route is not None
        deltas = self.context.backend.deltas(self, x, batch)
        for member, (out, delta) in enumerate(zip(outs, deltas, strict=True)):
            rows = out.view(-1, out.shape[-1])
            if self.dora_slots[member].isdisjoint(batch.slots_in_batch):
                rows.add_(delta.to(rows.dtype))
                continue
            g = self.dora[member].index_select(0, batch.dora_route)  # [tokens, out_m]
            bias: torch.Tensor | None = getattr(self.bases[member], "bias", None)
            if bias is None:
                # base + (g - 1) * base + g * delta = g * (base + delta): 5 ops, not 8
                rows.copy_(g.mul_(rows.float().add_(delta)))
                continue
            full = rows.float()
            # PEFT's `base_result - bias`, in the base result's dtype
            plain = (rows - bias.to(rows.dtype)).float()
            rows.copy_((g - 1).mul_(plain).addcmul_(g, delta.float()).add_(full))

    @property
    def dora_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dora)

    @property
    def nbytes(self) -> int:
        return sum(stack.nbytes for stack in self.stacks.values()) + self.dora_bytes


class MultiLoraLinear(nn.Module):
    """A frozen base linear layer plus its share of a `LoraGroup`, routed per batch row."""

    def __init__(
        self, base: nn.Module, name: str, shape: LinearShape, group: LoraGroup, member: int
    ) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.shape = shape
        self.member = member
        self.group = group  # shared with the sibling projections; holds the slot tensors
        group.bases.append(base)

    @property
    def occupied(self) -> set[int]:
        """Slots holding weights for this layer."""
        return set(self.group.ranks[self.member])

    def write_slot(self, slot: int, weights: ModuleWeights | None) -> None:
        self.group.write(self.member, slot, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.group.context.batch
        if batch is None or self.group.occupied.isdisjoint(batch.slots_in_batch):
            return self.base(x)
        return self.group.output(self.member, x, batch)

    # Called straight, without nn.Module's hook dispatch (~0.7 us of 1.6 per call, 210 calls
    # a step on SmolLM2): nothing hooks these wrappers, and the base layer inside is still
    # called as a module, hooks and all.
    __call__ = forward


def _is_linear(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb

        from loramux.server.nf4.native import NativeNf4Linear

        linear_types: tuple[type, ...] = (
            nn.Linear,
            bnb.nn.Linear4bit,
            bnb.nn.Linear8bitLt,
            NativeNf4Linear,
        )
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


def _groups(shapes: dict[str, LinearShape]) -> list[list[str]]:
    """Layer names grouped for fused shrinks: siblings in FUSED_SIBLINGS, else alone."""
    grouped: set[str] = set()
    groups: list[list[str]] = []
    for name in shapes:
        if name in grouped:
            continue
        parent, _, child = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        for siblings in FUSED_SIBLINGS:
            if child in siblings:
                names = [prefix + s for s in siblings]
                if all(
                    n in shapes and shapes[n].in_features == shapes[name].in_features for n in names
                ):
                    groups.append(names)
                    grouped.update(names)
                break
        if name not in grouped:
            groups.append([name])
            grouped.add(name)
    return groups


def wrap_linear_layers(
    model: Any, context: LoraContext, device: torch.device, fuse: bool = True
) -> dict[str, MultiLoraLinear]:
    """Replace every adaptable linear layer with a MultiLoraLinear, once, at start."""
    shapes = base_linear_shapes(model)
    wrapped: dict[str, MultiLoraLinear] = {}
    groups = _groups(shapes) if fuse else [[name] for name in shapes]
    for names in groups:
        group = LoraGroup(
            shapes[names[0]].in_features, [shapes[n].out_features for n in names], context, device
        )
        for member, name in enumerate(names):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = MultiLoraLinear(getattr(parent, child), name, shapes[name], group, member)
            setattr(parent, child, layer)
            wrapped[name] = layer
    return dict(sorted(wrapped.items(), key=lambda kv: list(shapes).index(kv[0])))


def iter_lora_layers(model: nn.Module) -> Iterator[MultiLoraLinear]:
    for module in model.modules():
        if isinstance(module, MultiLoraLinear):
            yield module


def lora_groups(layers: Mapping[str, MultiLoraLinear]) -> list[LoraGroup]:
    """The distinct groups of these layers, in order."""
    seen: dict[int, LoraGroup] = {}
    for layer in layers.values():
        seen.setdefault(id(layer.group), layer.group)
    return list(seen.values())
