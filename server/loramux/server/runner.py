"""The model runner: forward passes over the running batch, nothing about requests.

It owns the paged KV cache's storage and the LoRA routing context and turns "these rows,
these tokens at these positions, these blocks, these adapter slots" into logits. Two
kinds of pass:

* prefill: a chunk of each row's not-yet-cached tokens (a whole prompt, or a slice of a
  long one after the part already cached), right-padded to the longest chunk; each chunk
  attends causally to itself and to the row's tokens already in its blocks;
* decode: every decoding row advances by one token at its own position;
* mixed: both in one pass over the weights (a step that decodes while a prompt is being
  prefilled): every token flattened into one row with its own position, block table and
  adapter slot; attention runs per group of rows (attention.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from loramux.server.attention import KERNEL_MIN_CONTEXT, register_engine_attention
from loramux.server.kv_cache import (
    KernelBatch,
    PagedKVCache,
    PagedLayout,
    PoolAttention,
    RaggedLayout,
    SegmentGroup,
)
from loramux.server.lora import LoraBatchMetadata, LoraContext
from loramux.server.lora.tokens import TokenTable
from loramux.server.model_support import ModelShape


@dataclass(frozen=True)
class PrefillBatch:
    """A chunk of tokens per row, written at positions [start, start + len(chunk))."""

    prompts: list[list[int]]  # token ids per row: this pass's chunk
    slots: list[int]  # adapter slot per row (0 = base only)
    block_tables: list[list[int]]  # per row: its blocks, covering at least start + len(chunk)
    starts: list[int] | None = None  # tokens already cached per row (None: all 0)
    # Rows that want the logits at every position of their chunk (prompt scoring), not
    # only after its last token (None: none). Their [chunk tokens, vocab] rows follow the
    # [rows, vocab] last-token logits in the pass's output, in row order.
    scored: list[bool] | None = None

    def scored_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.scored or ()) if s]


@dataclass(frozen=True)
class DecodeBatch:
    """Decoding rows, one token each."""

    tokens: list[int]  # last sampled token per row
    positions: list[int]  # tokens already in the cache per row (= the new token's position)
    slots: list[int]
    block_tables: list[list[int]]  # per row: its blocks, covering at least position + 1


class ModelRunner:
    def __init__(
        self,
        model: Any,  # a transformers causal LM (PreTrainedModel)
        lora: LoraContext | None,
        pad_token_id: int,
        num_blocks: int,
        block_size: int,
        shape: ModelShape,
        attention_kernel: PoolAttention | None = None,
        tokens: TokenTable | None = None,
    ) -> None:
        self.model = model
        # The family's own step from the output layer to its logits (model_support.py).
        self.logit_transform = shape.logits
        # Attends decode rows (and chunks over long contexts) straight from the block pool;
        # None: every pass gathers each row's blocks for torch's SDPA (paged_attention/).
        self.kernel = attention_kernel
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.lora = lora
        # Adapters' trainable tokens: their embedding rows (and tied logit columns) for
        # their own rows of the batch; None or no such slot in a pass: the model's own.
        self.tokens = tokens
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.dtype = torch.bfloat16
        self.cache = PagedKVCache(
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=self.dtype,
            device=self.device,
            **shape.geometry,
        )
        model.set_attn_implementation(register_engine_attention())
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def _routing(
        self, slots: list[int], tokens_per_row: int, prompts: list[tuple[int, int]] | None = None
    ) -> LoraBatchMetadata | None:
        """`prompts`: (first token, count) of each prompt chunk in the flattened pass."""
        if self.lora is None or not any(slots):
            return None
        return self.lora.route(slots, tokens_per_row, self.device, prompts or ())

    def _tables(self, tables: list[list[int]], blocks: int) -> torch.Tensor:  # [rows, blocks]
        padded = [table[:blocks] + [0] * (blocks - len(table[:blocks])) for table in tables]
        return torch.tensor(padded, dtype=torch.long, device=self.device)

    def _forward(
        self,
        input_ids: torch.Tensor,  # [rows, T]
        position_ids: torch.Tensor,  # [rows, T]
        mask: torch.Tensor,  # [rows, 1, T, kv_length] additive (ragged: per group instead)
        layout: PagedLayout | RaggedLayout,
        routing: LoraBatchMetadata | None,
        token_slots: list[int],  # [rows] or [rows * T]: the adapter slot of each row or token
    ) -> torch.Tensor:  # [rows, T, hidden]
        self.cache.layout = layout
        if self.lora is not None:
            self.lora.batch = routing
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
        if self.tokens is not None and self.tokens.active(token_slots):
            inputs = {"inputs_embeds": self.tokens.embed(input_ids, token_slots)}
        try:
            out = self.decoder(
                **inputs,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kwarg: self.cache},
            )
        finally:
            self.cache.layout = None
            if self.lora is not None:
                self.lora.batch = None
        return out.last_hidden_state

    def _logits(
        self,
        hidden: torch.Tensor,  # [rows, hidden]
        row_slots: list[int],  # [rows]: each row's adapter slot (its trainable tokens' logits)
    ) -> torch.Tensor:  # [rows, vocab] float32
        logits = self.lm_head(hidden)
        if self.tokens is not None and self.tokens.active(row_slots):
            logits = self.tokens.patch_logits(logits, hidden, row_slots)
        return self.logit_transform(logits).float()

    def prefill(self, batch: PrefillBatch) -> torch.Tensor:
        """Run each row's chunk; return the logits after its last token [rows, vocab] float32,
        followed by every position's of the scored rows' chunks (`PrefillBatch.scored`)."""
        rows = len(batch.prompts)
        block_size = self.cache.block_size
        starts = torch.tensor(batch.starts or [0] * rows, dtype=torch.long, device=self.device)
        lengths = torch.tensor([len(p) for p in batch.prompts], device=self.device)
        width = int(lengths.max())
        ends = starts + lengths  # [rows]: tokens in each row's cache after this pass
        blocks = -(-int(ends.max()) // block_size)
        tables = self._tables(batch.block_tables, blocks)
        input_ids = torch.full(
            (rows, width), self.pad_token_id, dtype=torch.long, device=self.device
        )
        for i, prompt in enumerate(batch.prompts):
            input_ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        offsets = torch.arange(width, device=self.device)
        positions = starts[:, None] + offsets[None, :]  # [rows, T]
        valid = offsets[None, :] < lengths[:, None]  # [rows, T]
        written = torch.minimum(positions, ends[:, None] - 1)
        slots = tables.gather(1, written // block_size) * block_size + written % block_size
        kv_length = int(ends.max())
        columns = torch.arange(kv_length, device=self.device)
        allowed = (columns[None, None, :] <= positions[:, :, None]) & (
            columns[None, None, :] < ends[:, None, None]
        )  # [rows, T, columns]: causal over the row's own tokens, never padding
        all_valid = bool(valid.all())
        hidden = self._forward(
            input_ids,
            positions,
            self._additive(allowed[:, None]),
            PagedLayout(
                write_slots=slots.reshape(-1) if all_valid else slots[valid],
                valid=None if all_valid else valid,
                block_tables=tables,
                kv_length=kv_length,
            ),
            self._routing(
                batch.slots, width, [(i * width, len(p)) for i, p in enumerate(batch.prompts)]
            ),
            batch.slots,
        )
        last = hidden[torch.arange(rows, device=self.device), lengths - 1]
        scored = [hidden[i, : len(batch.prompts[i])] for i in batch.scored_rows()]
        row_slots = batch.slots + [
            batch.slots[i] for i in batch.scored_rows() for _ in batch.prompts[i]
        ]
        return self._logits(torch.cat([last, *scored]) if scored else last, row_slots)

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """Advance every decoding row by one token; return logits [rows, vocab] float32."""
        write_slots = self._write_slots(batch.block_tables, batch.positions)
        if self.kernel is not None:
            mask = self._unused_mask()
            layout = PagedLayout(
                write_slots,
                None,
                self._no_tables(),
                0,
                self._kernel_batch(self._decode_rows(batch)),
            )
        else:
            group = self._decode_group(batch)
            assert group.mask is not None
            mask = group.mask
            layout = PagedLayout(write_slots, None, group.block_tables, group.kv_length)
        hidden = self._forward(
            torch.tensor(batch.tokens, dtype=torch.long, device=self.device)[:, None],
            torch.tensor(batch.positions, dtype=torch.long, device=self.device)[:, None],
            mask,
            layout,
            self._routing(batch.slots, 1),
            batch.slots,
        )
        return self._logits(hidden[:, -1], batch.slots)

    def mixed(
        self, decode: DecodeBatch, prefill: PrefillBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode rows and prefill chunks in one pass over the weights.

        Returns (decode logits [decode rows, vocab], logits after each chunk's last token
        [chunks, vocab] then every position's of the scored chunks, as `prefill`), float32.
        The tokens are flattened, decode rows first, then
        each chunk's: no padding anywhere, and attention runs per group (the decode rows
        together, each chunk alone) on the same numbers as `decode` and `prefill` would.
        """
        starts = prefill.starts or [0] * len(prefill.prompts)
        tokens = list(decode.tokens)
        positions = list(decode.positions)
        slots = list(decode.slots)
        tables = list(decode.block_tables)
        by_kernel = self._decode_rows(decode) if self.kernel is not None else []
        groups = [self._decode_group(decode, masked=self.kernel is None)]
        lasts = list(range(len(tokens)))
        prompts: list[tuple[int, int]] = []
        for prompt, start, slot, table in zip(
            prefill.prompts, starts, prefill.slots, prefill.block_tables, strict=True
        ):
            first = len(tokens)
            tokens += prompt
            positions += range(start, start + len(prompt))
            slots += [slot] * len(prompt)
            tables += [table] * len(prompt)
            # Over a short context a chunk takes SDPA, as a prefill pass does, so that its
            # numbers do not depend on whether rows were decoding beside it.
            kernel = self.kernel is not None and start + len(prompt) >= KERNEL_MIN_CONTEXT
            if kernel:
                by_kernel.append((first, len(prompt), start, table))
            groups.append(
                self._chunk_group(slice(first, len(tokens)), start, table, masked=not kernel)
            )
            prompts.append((first, len(prompt)))
            lasts.append(len(tokens) - 1)
        device = self.device
        hidden = self._forward(
            torch.tensor([tokens], dtype=torch.long, device=device),
            torch.tensor([positions], dtype=torch.long, device=device),
            self._unused_mask(),  # per group instead
            RaggedLayout(
                self._write_slots(tables, positions),
                groups,
                self._kernel_batch(by_kernel) if by_kernel else None,
            ),
            self._routing(slots, 1, prompts),
            slots,
        )
        for i in prefill.scored_rows():
            first, count = prompts[i]
            lasts += range(first, first + count)
        logits = self._logits(hidden[0, lasts], [slots[i] for i in lasts])
        rows = len(decode.tokens)
        return logits[:rows], logits[rows:]

    def _write_slots(
        self, tables: list[list[int]], positions: list[int]
    ) -> torch.Tensor:  # [tokens] int64: block * block_size + offset of each new token
        size = self.cache.block_size
        slots = [t[p // size] * size + p % size for t, p in zip(tables, positions, strict=True)]
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def _unused_mask(self) -> torch.Tensor:  # [1, 1, 1, 1]: attention masks per group
        return torch.zeros((1, 1, 1, 1), dtype=self.dtype, device=self.device)

    def _no_tables(self) -> torch.Tensor:  # [0, 0]: the kernel reads its own tables
        return torch.zeros((0, 0), dtype=torch.long, device=self.device)

    @staticmethod
    def _decode_rows(batch: DecodeBatch) -> list[tuple[int, int, int, list[int]]]:
        """The kernel's sequences for decoding rows: row i is pass token i, one query."""
        return [
            (i, 1, position, table)
            for i, (position, table) in enumerate(
                zip(batch.positions, batch.block_tables, strict=True)
            )
        ]

    def _kernel_batch(self, sequences: list[tuple[int, int, int, list[int]]]) -> KernelBatch:
        """(first token in the pass, query tokens, first position, block table) per sequence
        -> the kernel's int64 arrays, each table cut to the blocks its positions cover."""
        assert self.kernel is not None
        size = self.cache.block_size
        rows: list[tuple[int, int, int, int]] = []
        flat: list[int] = []
        for first, count, start, table in sequences:
            blocks = -(-(start + count) // size)
            if len(table) < blocks:
                raise ValueError(f"block table of {len(table)} blocks for {start + count} tokens")
            rows.append((first, count, start, len(flat)))
            flat += table[:blocks]
        return KernelBatch(
            torch.tensor(rows, dtype=torch.long, device=self.device),
            torch.tensor(flat, dtype=torch.long, device=self.device),
            self.kernel,
            max(count for _, count, _, _ in rows),
        )

    def _decode_group(self, batch: DecodeBatch, masked: bool = True) -> SegmentGroup:
        """Decoding rows (a decode pass, or part of a mixed one): one token each at its own
        position, attending to its own tokens up to it. Unmasked: the kernel's (no mask,
        no gather)."""
        if not masked:
            return SegmentGroup(
                slice(0, len(batch.tokens)), len(batch.tokens), self._no_tables(), 0, None
            )
        kv_length = max(batch.positions) + 1
        blocks = -(-kv_length // self.cache.block_size)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=self.device)
        columns = torch.arange(kv_length, device=self.device)
        allowed = columns[None, :] <= positions[:, None]  # [rows, columns]
        return SegmentGroup(
            tokens=slice(0, len(batch.tokens)),
            rows=len(batch.tokens),
            block_tables=self._tables(batch.block_tables, blocks),
            kv_length=kv_length,
            mask=self._additive(allowed[:, None, None]),
        )

    def _chunk_group(
        self, tokens: slice, start: int, table: list[int], masked: bool = True
    ) -> SegmentGroup:
        """One prompt's chunk at positions [start, start + its length), causal (unmasked:
        the kernel's)."""
        count = tokens.stop - tokens.start
        if not masked:
            return SegmentGroup(tokens, 1, self._no_tables(), 0, None)
        kv_length = start + count
        blocks = -(-kv_length // self.cache.block_size)
        positions = torch.arange(start, kv_length, device=self.device)
        columns = torch.arange(kv_length, device=self.device)
        allowed = columns[None, :] <= positions[:, None]  # [T, columns]
        return SegmentGroup(
            tokens=tokens,
            rows=1,
            block_tables=self._tables([table], blocks),
            kv_length=kv_length,
            mask=self._additive(allowed[None, None]),
        )

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
