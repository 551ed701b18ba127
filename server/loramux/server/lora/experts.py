"""Multi-LoRA on fused MoE experts: each row's expert deltas on the experts its router picked.

transformers 5 keeps a MoE layer's experts as 3-D parameters in one `...Experts` module
(`gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]; [E, in, out] where the class says
`is_transposed`, as GPT-OSS's), which the family's sparse block calls with its own router's
choice: `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`. bitsandbytes
quantises nn.Linear only, so on an NF4 base they stay bf16, in the engine as in PEFT.

PEFT adapts them with `ParamWrapper` (`target_parameters`): per expert e the parameter
becomes W_e + s B_e A_e for the forward. The parameter here is shared by every row of a
mixed batch, so it is never changed: `MultiLoraExperts` takes the experts module's place
and computes, for each (token, chosen expert) pair, W_e x (+ bias) + s B_e (A_e x) with the
A_e and B_e of the token's adapter slot (slot 0, no adapter, holds zeros), then the
module's own gate (`_apply_gate`: split, interleaved or clamped as the family does) or
activation, the same for `down_proj`, the routing weight, and the sum over the chosen
experts, in the order transformers' eager experts forward adds them. The router runs
before, in the model's own code, unchanged: the routing is the model's. A batch without
an expert adapter calls the module as it is.

Only modules that transformers' `use_experts_implementation` decorates are taken: their
flags (`is_transposed`, `has_bias`, `has_gate`, `has_post_expert_norm`) and `_apply_gate`
are everything transformers' own batched and grouped experts forwards read (grouped_mm is
the default on the CPU: PEFT's reference runs it), so the computation here is the
module's for every family that has them; a module without them is not adaptable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loramux.server.adapters import ExpertShape

if TYPE_CHECKING:
    from loramux.server.adapters import ExpertWeights
    from loramux.server.lora.metadata import LoraContext

# The fused projections of transformers' experts modules (`use_experts_implementation`):
# the first reads the hidden state (gate_up_proj, or up_proj without a gate), down_proj the
# gated intermediate state.
_FIRST = ("gate_up_proj", "up_proj")
_DOWN = "down_proj"
_FLAGS = ("is_transposed", "has_bias", "has_gate", "num_experts")


def _projections(module: nn.Module) -> tuple[str, str] | None:
    """(first, down) parameter names of a fused experts module, or None if it is not one."""
    if not all(hasattr(module, flag) for flag in _FLAGS):
        return None
    first = _FIRST[0] if getattr(module, "has_gate", False) else _FIRST[1]
    for name in (first, _DOWN):
        param = getattr(module, name, None)
        if not isinstance(param, torch.Tensor) or param.dim() != 3:
            return None
    return first, _DOWN


def _shape(module: nn.Module, name: str) -> ExpertShape:
    experts, rows, cols = getattr(module, name).shape
    if getattr(module, "is_transposed", False):  # [E, in, out]
        return ExpertShape(experts, rows, cols)
    return ExpertShape(experts, cols, rows)  # [E, out, in], as nn.Linear's weight


def base_expert_shapes(model: nn.Module) -> dict[str, ExpertShape]:
    """Every fused experts parameter adapters may target ("...mlp.experts.down_proj"), each
    module's in its declaration order (PEFT nests its wrappers in that order)."""
    shapes: dict[str, ExpertShape] = {}
    wrappers: list[str] = []
    for name, found in model.named_modules():
        # a wrapper stands where its module was (the module inside is not listed again)
        if any(name.startswith(f"{w}.") for w in wrappers):
            continue
        module = found
        if isinstance(found, MultiLoraExperts):
            module = found.base
            wrappers.append(name)
        projections = _projections(module)
        if projections is None:
            continue
        for param, _ in module.named_parameters(recurse=False):
            if param in projections:
                shapes[f"{name}.{param}"] = _shape(module, param)
    return shapes


@dataclass
class ExpertStack:
    """Every slot's LoRA on one fused parameter; row 0 (no adapter) stays zero."""

    a: torch.Tensor  # [slots, experts, width, in] bf16: A_e, rank rows past a slot's rank zero
    bt: torch.Tensor  # [slots, experts, width, out] bf16: B_e transposed
    scale: torch.Tensor  # [slots] float32: the slot's LoRA scaling (0 where empty)

    @property
    def width(self) -> int:
        return self.a.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.bt, self.scale))

    def delta(self, expert: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """s B_e A_e x for each row of x [n, in] on its slot [n]: [n, out]."""
        a = self.a[slots, expert]  # [n, width, in]
        bt = self.bt[slots, expert]  # [n, width, out]
        shrunk = torch.bmm(x.unsqueeze(1), a.transpose(1, 2))  # [n, 1, width]
        shrunk = shrunk * self.scale[slots].to(shrunk.dtype)[:, None, None]
        return torch.bmm(shrunk, bt).squeeze(1)


class MultiLoraExperts(nn.Module):
    """A fused experts module plus every slot's LoRA on its projections, routed per token."""

    def __init__(
        self, base: nn.Module, name: str, context: LoraContext, device: torch.device
    ) -> None:
        super().__init__()
        projections = _projections(base)
        assert projections is not None, name
        self.base = base
        self.name = name
        self.context = context
        self.device = device
        self.first, self.down = projections
        self.shapes = {p: _shape(base, p) for p in projections}
        self.stacks: dict[str, ExpertStack] = {}  # parameter -> its slots (made on first use)
        self.occupied: set[int] = set()  # slots holding weights for any parameter

    @property
    def nbytes(self) -> int:
        return sum(stack.nbytes for stack in self.stacks.values())

    @property
    def slot_nbytes(self) -> int:
        """Bytes one slot takes in the stacks as they are now."""
        return sum(stack.nbytes // stack.a.shape[0] for stack in self.stacks.values())

    def install(self, slot: int, weights: Mapping[str, ExpertWeights]) -> None:
        """Copy an adapter's expert LoRA (parameter short name -> weights) into `slot`."""
        self.forget(slot)
        for param, w in weights.items():
            shape = self.shapes[param]
            rank = w.lora_a.shape[1]
            stack = self._fit(param, shape, rank)
            stack.a[slot, :, :rank] = w.lora_a.to(stack.a.device, stack.a.dtype)
            stack.bt[slot, :, :rank] = w.lora_b.transpose(1, 2).to(stack.bt.device, stack.bt.dtype)
            stack.scale[slot] = w.scaling
            self.occupied.add(slot)

    def forget(self, slot: int) -> None:
        for stack in self.stacks.values():
            stack.a[slot].zero_()
            stack.bt[slot].zero_()
            stack.scale[slot] = 0.0
        self.occupied.discard(slot)
        if not self.occupied:
            self.stacks.clear()  # no adapter on the experts left: give the memory back

    def _fit(self, param: str, shape: ExpertShape, rank: int) -> ExpertStack:
        """The parameter's stack, made or widened to hold `rank` rows (zeros pad: exact)."""
        old = self.stacks.get(param)
        if old is not None and old.width >= rank:
            return old
        slots = self.context.table.num_slots
        new = ExpertStack(
            a=torch.zeros(
                slots, shape.num_experts, rank, shape.in_features,
                dtype=torch.bfloat16, device=self.device,
            ),
            bt=torch.zeros(
                slots, shape.num_experts, rank, shape.out_features,
                dtype=torch.bfloat16, device=self.device,
            ),
            scale=torch.zeros(slots, dtype=torch.float32, device=self.device),
        )  # fmt: skip
        if old is not None:
            new.a[:, :, : old.width] = old.a
            new.bt[:, :, : old.width] = old.bt
            new.scale.copy_(old.scale)
        self.stacks[param] = new
        return new

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:  # hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]
        batch = self.context.batch
        if batch is None or self.occupied.isdisjoint(batch.slots_in_batch):
            return self.base(hidden, top_k_index, top_k_weights)
        slots = batch.slot_per_token  # [T] int64
        if slots.shape[0] != hidden.shape[0]:
            raise RuntimeError(
                f"{self.name}: {hidden.shape[0]} tokens for a batch of {slots.shape[0]}"
            )
        base: Any = self.base  # a transformers experts module: its flags, gate, activation
        out = torch.zeros_like(hidden)
        num_experts = int(base.num_experts)
        for expert in torch.unique(top_k_index).tolist():  # ascending, as eager's loop
            if expert >= num_experts:  # an expert-parallel sentinel: not this rank's
                continue
            token, position = torch.where(top_k_index == expert)
            rows = slots[token]
            state = self._project(self.first, expert, hidden[token], rows)
            state = base._apply_gate(state) if base.has_gate else base.act_fn(state)
            state = self._project(self.down, expert, state, rows)
            if getattr(base, "has_post_expert_norm", False):
                state = base.post_expert_norm(state)
            state = state * top_k_weights[token, position, None]
            out.index_add_(0, token, state.to(out.dtype))
        return out

    def _project(
        self, param: str, expert: int, x: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:  # x [n, in] -> [n, out]
        weight = getattr(self.base, param)[expert]
        y = x @ weight if self.base.is_transposed else nn.functional.linear(x, weight)
        if self.base.has_bias:
            y = y + getattr(self.base, f"{param}_bias")[expert]
        stack = self.stacks.get(param)
        if stack is not None:
            y = y + stack.delta(expert, x, slots).to(y.dtype)
        return y


def wrap_experts(
    model: nn.Module, context: LoraContext, device: torch.device
) -> dict[str, MultiLoraExperts]:
    """Replace every fused experts module with a MultiLoraExperts, once, at start."""
    wrapped: dict[str, MultiLoraExperts] = {}
    for name, module in list(model.named_modules()):
        if _projections(module) is None or isinstance(module, MultiLoraExperts):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MultiLoraExperts(module, name, context, device)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def expert_weights_of(
    experts: Mapping[str, ExpertWeights], module: str
) -> dict[str, ExpertWeights]:
    """An adapter's expert LoRA for one experts module, by parameter short name."""
    prefix = f"{module}."
    return {n.removeprefix(prefix): w for n, w in experts.items() if n.startswith(prefix)}
