"""Adapter routing for one forward pass, built once and shared by every layer.

cf. LoRAX's AdapterBatchMetadata and vLLM's punica wrapper metadata: the rows of the
batch grouped by rank class (`ClassRoute`), and for batches with only a few distinct
adapters the one-hot mask of the dense path (`DenseRoute`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from loramux.server.lora.slots import Placement, SlotTable

if TYPE_CHECKING:
    from loramux.server.lora.backend.base import LoraBackend
    from loramux.server.lora.slots import SlotFormat


@dataclass(frozen=True)
class ClassRoute:
    """The rows of the batch whose adapter sits in one rank class."""

    width: int  # the class's rank rows
    rows: torch.Tensor  # [n] int64: batch rows served from this class
    index: torch.Tensor  # [n] int64: each row's adapter's index in the class stack
    all_rows: bool  # every row of the batch is in this class (no gather, no scatter)


@dataclass(frozen=True)
class DenseRoute:
    """Few distinct adapters: GEMMs over just their weights, a mask per token."""

    key: tuple[int, ...]  # the distinct non-zero slots, sorted
    placements: tuple[Placement, ...]  # where each of them sits
    token_mask: torch.Tensor | None  # [tokens, U] float32 one-hot; None: every row uses key[0]


@dataclass(frozen=True)
class PromptChunk:
    """A prompt's tokens in this pass: consecutive in the flattened batch, one adapter."""

    start: int  # first token (index into the pass's flattened tokens)
    stop: int  # one past the last
    slot: int
    placement: Placement


@dataclass(frozen=True)
class Segments:
    """One rank class's tokens as runs of consecutive tokens on one adapter (SGMV/BGMV
    kernels, backend/triton_ops.py): decoding rows are runs of one token (`singles`), a
    prompt chunk or a padded prefill row one longer run (`runs`)."""

    single_tokens: torch.Tensor  # [S1] int64: the token of each one-token run
    single_index: torch.Tensor  # [S1] int64: its adapter's index in the class stack
    run_starts: torch.Tensor  # [S2] int64: first token of each longer run
    run_lens: torch.Tensor  # [S2] int64: its tokens
    run_index: torch.Tensor  # [S2] int64
    longest: int  # the longest run's tokens (1 when there are only singles)


@dataclass(frozen=True)
class LoraBatchMetadata:
    row_slots: tuple[int, ...]  # device slot per batch row, 0 = base model only
    slots_in_batch: frozenset[int]  # distinct non-zero slots (layers skip what they don't hold)
    tokens_per_row: int  # 1 for decode, T for a (right-padded) prefill
    routes: tuple[ClassRoute, ...]  # per rank class present
    row_route: torch.Tensor  # [rows, 2] int64: (rank class width, index); width 0 = no adapter
    dense: DenseRoute | None  # set when the backend takes the dense path for this batch
    # Prompt chunks with an adapter (backends that compute them as PEFT does, GEMMs per chunk)
    chunks: tuple[PromptChunk, ...] = ()
    # With chunks: [tokens, 2] int64, row_route per token with every chunk token at width
    # 0; None when no token is left outside the chunks (a padded prefill's padding is not)
    token_route: torch.Tensor | None = None
    device: torch.device | None = None  # where the routing tensors live
    route_list: tuple[tuple[int, int], ...] = ()  # row_route as Python ints
    # [tokens] int64: each token's row of the DoRA scale stacks (0: ones); None when no
    # slot of the batch is a DoRA adapter (the layers then do nothing DoRA at all)
    dora_route: torch.Tensor | None = None

    @cached_property
    def route_per_token(self) -> torch.Tensor:  # [tokens, 2] int64: row_route per token
        """`row_route` repeated for each token of its row (once per pass, not per layer)."""
        if self.tokens_per_row == 1:
            return self.row_route
        return self.row_route.repeat_interleave(self.tokens_per_row, 0)

    @cached_property
    def slot_per_token(self) -> torch.Tensor:  # [tokens] int64: each token's device slot
        """`row_slots` per token (the MoE experts route each token by it, lora/experts.py)."""
        slots = torch.tensor(self.row_slots, dtype=torch.long, device=self.device)
        return slots.repeat_interleave(self.tokens_per_row) if self.tokens_per_row > 1 else slots

    @cached_property
    def segments(self) -> dict[int, Segments]:
        """Per rank class present, its tokens as runs on one adapter (once per pass): each
        prompt chunk (or padded prefill row) a run, each other token a run of one."""
        runs: dict[int, list[tuple[int, int, int]]] = {}  # width -> (start, length, index)
        per_row = self.tokens_per_row
        in_chunk = [False] * len(self.route_list)
        if per_row == 1:  # a ragged pass: its chunks are runs (a padded one: its rows)
            for chunk in self.chunks:
                width, index = self.route_list[chunk.start]
                runs.setdefault(width, []).append((chunk.start, chunk.stop - chunk.start, index))
                in_chunk[chunk.start : chunk.stop] = [True] * (chunk.stop - chunk.start)
        for row, (width, index) in enumerate(self.route_list):
            if width and not in_chunk[row]:
                runs.setdefault(width, []).append((row * per_row, per_row, index))
        return {width: _segments(found, self.device) for width, found in runs.items()}

    @classmethod
    def build(
        cls,
        slots: list[int],
        tokens_per_row: int,
        table: SlotTable,
        device: torch.device,
        dense_max_adapters: int,
        prompts: Sequence[tuple[int, int]] = (),
    ) -> LoraBatchMetadata:
        """`prompts`: (first token, token count) of each prompt chunk in the flattened pass,
        whose adapter is its first token's row's. A padded prefill (tokens_per_row > 1)
        is all prompt chunks and padding."""
        distinct = sorted({s for s in slots if s})
        placements = {s: table.placement(s) for s in distinct}
        missing = [s for s, p in placements.items() if p is None]
        if missing:
            raise ValueError(f"slots {missing} hold no adapter")
        by_width: dict[int, tuple[list[int], list[int]]] = {}
        row_route = [[0, 0]] * len(slots)
        for row, slot in enumerate(slots):
            if slot:
                placement = placements[slot]
                assert placement is not None
                row_route[row] = [placement.width, placement.index]
                rows, index = by_width.setdefault(placement.width, ([], []))
                rows.append(row)
                index.append(placement.index)
        routes = tuple(
            ClassRoute(
                width=width,
                rows=torch.tensor(rows, dtype=torch.long, device=device),
                index=torch.tensor(index, dtype=torch.long, device=device),
                all_rows=len(rows) == len(slots),
            )
            for width, (rows, index) in sorted(by_width.items())
        )
        dense = None
        if 0 < len(distinct) <= dense_max_adapters:
            mask = None
            if len(distinct) > 1 or 0 in slots:
                groups = torch.tensor(
                    [distinct.index(s) if s else len(distinct) for s in slots], device=device
                ).repeat_interleave(tokens_per_row)
                # One extra column for base-only rows, dropped: their mask rows are zero.
                mask = torch.nn.functional.one_hot(groups, len(distinct) + 1)[:, :-1].float()
            dense = DenseRoute(
                key=tuple(distinct),
                placements=tuple(p for p in placements.values() if p is not None),
                token_mask=mask,
            )
        chunks = tuple(
            PromptChunk(start, start + count, slot, placements[slot])  # type: ignore[arg-type]
            for start, count in prompts
            if count > 0 and (slot := slots[start // tokens_per_row])
        )
        token_route = None
        if tokens_per_row == 1 and chunks:
            token_route = list(row_route)
            for chunk in chunks:
                token_route[chunk.start : chunk.stop] = [[0, 0]] * (chunk.stop - chunk.start)
            if not any(width for width, _ in token_route):
                token_route = None
        dora_rows = [table.dora_index(s) if s else 0 for s in slots]
        dora_route = None
        if any(dora_rows):
            dora_route = torch.tensor(dora_rows, dtype=torch.long, device=device)
            if tokens_per_row > 1:
                dora_route = dora_route.repeat_interleave(tokens_per_row)
        return cls(
            row_slots=tuple(slots),
            slots_in_batch=frozenset(distinct),
            tokens_per_row=tokens_per_row,
            routes=routes,
            row_route=torch.tensor(row_route, dtype=torch.long, device=device).view(-1, 2),
            dense=dense,
            chunks=chunks,
            device=device,
            route_list=tuple((int(w), int(i)) for w, i in row_route),
            token_route=None
            if token_route is None
            else torch.tensor(token_route, dtype=torch.long, device=device).view(-1, 2),
            dora_route=dora_route,
        )


def _segments(runs: list[tuple[int, int, int]], device: torch.device | None) -> Segments:
    """(start, length, index) runs -> the kernels' tensors, one-token runs apart."""
    singles = [(start, index) for start, length, index in runs if length == 1]
    longer = [run for run in runs if run[1] > 1]
    single = torch.tensor(singles, dtype=torch.long, device=device).view(-1, 2)
    run = torch.tensor(longer, dtype=torch.long, device=device).view(-1, 3)
    return Segments(  # contiguous: the kernels index them as flat arrays
        single_tokens=single[:, 0].contiguous(),
        single_index=single[:, 1].contiguous(),
        run_starts=run[:, 0].contiguous(),
        run_lens=run[:, 1].contiguous(),
        run_index=run[:, 2].contiguous(),
        longest=max((length for _, length, _ in runs), default=0),
    )


@dataclass
class LoraContext:
    """Shared by every layer: the backend, the slot format and placement, the current batch.

    The runner sets `batch` before each forward pass and clears it after.
    """

    backend: LoraBackend
    slot_format: SlotFormat
    table: SlotTable
    batch: LoraBatchMetadata | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def route(
        self,
        slots: list[int],
        tokens_per_row: int,
        device: torch.device,
        prompts: Sequence[tuple[int, int]] = (),
    ) -> LoraBatchMetadata:
        return LoraBatchMetadata.build(
            slots, tokens_per_row, self.table, device, self.backend.dense_max_adapters, prompts
        )
