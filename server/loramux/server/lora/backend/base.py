"""The LoRA backend interface: shrink and expand for a group of projections.

Layers own the stacked slot tensors and the routing (`layer.LoraGroup`,
`metadata.LoraBatchMetadata`); a backend, chosen once at start for the platform
(`make_backend`), turns them into deltas. Three shapes of work, none of which loops over
adapters in Python:

* few distinct adapters (`dense`): float32 GEMMs over just those adapters' weights,
  gathered once and reused while the batch keeps them, with a per-token mask;
* decode with many distinct adapters (`decode`): a BGMV-style gather-reduce per rank
  class that reads each row's slot in place (`bgmv_group`, compiled so the gathers
  never materialise);
* prefill with many distinct adapters (`prefill`): a segmented batched matmul per rank
  class, a segment per row (`segmented_group`).
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from loramux.server.lora.metadata import (
    ClassRoute,
    DenseRoute,
    LoraBatchMetadata,
    PromptChunk,
)

if TYPE_CHECKING:
    from loramux.server.lora.layer import LoraGroup

GroupKernel = Callable[..., list[torch.Tensor]]


def bgmv_group(
    x: torch.Tensor,  # [n, in]
    a: torch.Tensor,  # [C, M * W, in]: the group's stacked A of one rank class
    row_scale: torch.Tensor,  # [C, M * W] float32
    bts: Sequence[torch.Tensor],  # M x [C, W, out_m]
    index: torch.Tensor,  # [n] int64: each row's position in the class stack
) -> list[torch.Tensor]:  # M x [n, out_m], x.dtype
    """Per-token deltas of every member as gather-reduce; one shrink for all members.

    Compiled, the gathers `a[index]` and `bt[index]` are fused into the reductions: no
    per-token copy of adapter weights is made (that copy is what makes gather + bmm slow).
    """
    shrunk = (a[index].float() * x[:, None, :].float()).sum(-1) * row_scale[index]  # [n, M*W]
    width = bts[0].shape[1]
    return [
        (bt[index].float() * shrunk[:, m * width : (m + 1) * width, None]).sum(1).to(x.dtype)
        for m, bt in enumerate(bts)
    ]


def segmented_group(
    x: torch.Tensor,  # [n, T, in]
    a: torch.Tensor,  # [C, M * W, in]
    row_scale: torch.Tensor,  # [C, M * W] float32
    bts: Sequence[torch.Tensor],  # M x [C, W, out_m]
    index: torch.Tensor,  # [n] int64
) -> list[torch.Tensor]:  # M x [n, T, out_m], x.dtype
    """One batched matmul per member, a segment per row (prefill: weights amortised over T).

    The row scale multiplies the shrunk activations [n, T, M*W], as in `bgmv_group` and
    PEFT (`lora_B(lora_A(x)) * scaling`), not the gathered weights [n, M*W, in]: that
    broadcast product took 9 ms of a 9.5 ms call on SmolLM2's q/k/v group (32 rows of 32
    tokens, 2 threads), the whole call now ~0.8 ms.
    """
    rows = a.index_select(0, index).float()  # [n, M*W, in]
    shrunk = torch.bmm(x.float(), rows.transpose(1, 2))  # [n, T, M*W]
    shrunk.mul_(row_scale.index_select(0, index)[:, None, :])
    width = bts[0].shape[1]
    return [
        torch.bmm(shrunk[:, :, m * width : (m + 1) * width], bt.index_select(0, index).float()).to(
            x.dtype
        )
        for m, bt in enumerate(bts)
    ]


class LoraBackend(ABC):
    """Computes a group's LoRA deltas for one pass; the platform policy lives in subclasses."""

    name: str
    # Up to this many distinct adapters in a batch, the dense path is taken.
    dense_max_adapters: int

    def __init__(self, kernel: str = "compiled") -> None:
        self.kernel_mode = kernel
        self.decode_kernel: GroupKernel = (
            bgmv_group if kernel == "eager" else self._compile(bgmv_group)
        )

    def _compile(self, kernel: GroupKernel) -> GroupKernel:
        # One graph per group arity (1-3 members) and row count class (1 row / more) per
        # model shape: 8 on SmolLM2, dynamo's default limit, past which it silently runs
        # the kernel eagerly (a per-token copy of the weights). Room for other shapes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return torch.compile(kernel, dynamic=True)  # type: ignore[return-value]

    def deltas(
        self, group: LoraGroup, x: torch.Tensor, batch: LoraBatchMetadata
    ) -> list[torch.Tensor]:
        """Every member's delta [tokens, out_m] for `x` [tokens, in]."""
        if batch.dense is not None:
            return self.dense(group, x, batch.dense)
        if batch.tokens_per_row == 1:
            return self._routed(group, x, batch.routes, self.decode_kernel)
        grouped = x.view(len(batch.row_slots), batch.tokens_per_row, -1)
        outs = self._routed(group, grouped, batch.routes, segmented_group)
        return [out.view(x.shape[0], -1) for out in outs]

    def _routed(
        self,
        group: LoraGroup,
        x: torch.Tensor,  # [rows, ...tokens, in]
        routes: tuple[ClassRoute, ...],
        kernel: GroupKernel,
    ) -> list[torch.Tensor]:
        """Run `kernel` per rank class present and put each class's rows in place."""
        if len(routes) == 1 and routes[0].all_rows:
            stack = group.stacks[routes[0].width]
            return kernel(x, stack.a, stack.row_scale, stack.bts, routes[0].index)
        outs = [x.new_zeros(*x.shape[:-1], out) for out in group.outs]
        for route in routes:
            stack = group.stacks[route.width]
            parts = kernel(
                x.index_select(0, route.rows), stack.a, stack.row_scale, stack.bts, route.index
            )
            for out, part in zip(outs, parts, strict=True):
                out.index_copy_(0, route.rows, part)
        return outs

    def add_deltas(
        self,
        group: LoraGroup,
        x: torch.Tensor,  # [tokens, in]
        batch: LoraBatchMetadata,
        outs: Sequence[torch.Tensor],  # M x [..., out_m]: the members' base outputs, tokens
    ) -> None:  # in x's order
        """Add every member's delta to its base output in place, rounded to the output's
        dtype first, as PEFT's 4-bit LoRA layers do (`result + lora(x).to(result.dtype)`)."""
        for out, delta in zip(outs, self.deltas(group, x, batch), strict=True):
            out.add_(delta.to(out.dtype).view(out.shape))

    def dense(self, group: LoraGroup, x: torch.Tensor, route: DenseRoute) -> list[torch.Tensor]:
        """float32 GEMMs over just the batch's adapters; the mask keeps each token's own block.

        float32 because small bf16 GEMMs carry ~10 us of fixed cost each on CPU (measured).
        """
        weights = group.dense_weights(route)
        shrunk = torch.mm(x.float(), weights.a_t)  # [tokens, K]
        if route.token_mask is not None:
            shrunk.mul_(route.token_mask.index_select(1, weights.column_slot))
        offsets = weights.offsets
        return [
            torch.mm(shrunk[:, offsets[m] : offsets[m + 1]], bt).to(x.dtype)
            for m, bt in enumerate(weights.bts)
        ]

    def prompt_chunk(
        self,
        group: LoraGroup,
        x: torch.Tensor,  # [tokens, in] the pass's flattened input
        chunk: PromptChunk,
        outs: Sequence[torch.Tensor],  # M x [tokens, out_m]: the chunk's rows are added to
    ) -> None:
        """A prompt chunk's deltas computed as PEFT computes them, GEMM for GEMM.

        PEFT's LoRA layer on a 4-bit base keeps A and B in float32 and runs
        `(lora_B(lora_A(x.float())) * scaling).to(bf16)` over the prompt's tokens: two
        float32 GEMMs (MKL here) whose summation order no kernel of ours reproduces, and
        in bf16 a one-ulp difference anywhere grows into ~0.1 logit of noise that flips
        near-tied tokens. The same two GEMMs on the same shapes ([tokens, in] x [r, in]^T,
        then x [out, r]^T, the scaling after) give PEFT's numbers bit for bit in the
        prompt, where the base model's are PEFT's too (a padded prefill's prefill logits
        were then identical to PEFT's in 3 of 5 adapter rows, against 0 of 5 with the
        native kernel; a batched decode step's base numbers are not PEFT's, so decode
        keeps the kernel). Measured on tests/test_composition.py: 99 tokens compared with
        PEFT before near-tie partings with the native kernel alone, 120 with this (the
        compiled backend 117; 112 are asked); 48 lone requests x 12 tokens: 464 -> 510
        tokens equal to PEFT's before the first parting (compiled 492).
        """
        weights = group.peft_weights(chunk.slot, chunk.placement)
        tokens = x[chunk.start : chunk.stop].float()
        for member, (out, member_weights) in enumerate(zip(outs, weights, strict=True)):
            if member_weights is None:
                continue
            a, b = member_weights  # [r, in], [out, r]: PEFT's lora_A and lora_B weights
            scaling = group.scalings[member].get(chunk.slot)
            shrunk = torch.nn.functional.linear(tokens, a)
            if scaling is None:  # composed or int8: a factor per rank row, before B
                p = chunk.placement
                width = p.width
                factors = group.stacks[width].row_scale[p.index, member * width :]
                shrunk.mul_(factors[: a.shape[0]])
                delta = torch.nn.functional.linear(shrunk, b)
            else:
                delta = torch.nn.functional.linear(shrunk, b).mul_(scaling)
            out[chunk.start : chunk.stop].add_(delta.to(out.dtype))  # rounded, then added

    def warm(self, group: LoraGroup) -> None:
        """Compile the decode kernel for this group's shapes before the first request."""
        if self.kernel_mode == "eager":
            return
        device, dtype = group.device, group.context.slot_format.dtype
        width = 8
        a = torch.zeros(2, group.members * width, group.in_features, dtype=dtype, device=device)
        scale = torch.zeros(2, group.members * width, device=device)
        # A tuple, as ClassStack.bts: dynamo guards on the container type (a list here
        # compiled a second graph per group shape and hit its recompile limit).
        bts = tuple(torch.zeros(2, width, out, dtype=dtype, device=device) for out in group.outs)
        for rows in (1, 2):
            x = torch.zeros(rows, group.in_features, dtype=torch.bfloat16, device=device)
            index = torch.zeros(rows, dtype=torch.long, device=device)
            with torch.inference_mode():
                self.decode_kernel(x, a, scale, bts, index)
