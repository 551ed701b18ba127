"""The model runner: forward passes over the running batch, nothing about requests.

It owns the KV cache and the LoRA routing context and turns "these rows, these tokens,
these adapter slots" into logits. Two kinds of pass:

* prefill: new rows, right-padded to the longest prompt, causal mask with key padding;
* decode: every running row advances by one token at its own position.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from loramux.server.kv_cache import SlotKVCache, StepLayout
from loramux.server.lora import LoraBatchMetadata, LoraContext


@dataclass(frozen=True)
class PrefillBatch:
    """New rows appended to the cache at [row_start, row_start + rows)."""

    row_start: int
    prompts: list[list[int]]  # token ids per row
    slots: list[int]  # adapter slot per row (0 = base only)


@dataclass(frozen=True)
class DecodeBatch:
    """All running rows [0, rows), one token each."""

    tokens: list[int]  # last sampled token per row
    positions: list[int]  # tokens already in the cache per row (= the new token's position)
    slots: list[int]


class ModelRunner:
    def __init__(
        self,
        model: Any,  # a transformers causal LM (PreTrainedModel)
        lora: LoraContext | None,
        max_rows: int,
        pad_token_id: int,
    ) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.lora = lora
        self.pad_token_id = pad_token_id
        config = model.config
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.device = next(model.parameters()).device
        self.dtype = torch.bfloat16
        self.cache = SlotKVCache(
            num_layers=config.num_hidden_layers,
            max_rows=max_rows,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def _routing(self, slots: list[int], tokens_per_row: int) -> LoraBatchMetadata | None:
        if self.lora is None or not any(slots):
            return None
        return self.lora.route(slots, tokens_per_row, self.device)

    def _forward(
        self,
        input_ids: torch.Tensor,  # [rows, T]
        position_ids: torch.Tensor,  # [rows, T]
        mask: torch.Tensor,  # [rows, 1, T, kv_length] additive
        layout: StepLayout,
        routing: LoraBatchMetadata | None,
    ) -> torch.Tensor:  # [rows, T, hidden]
        self.cache.layout = layout
        if self.lora is not None:
            self.lora.batch = routing
        try:
            out = self.decoder(
                input_ids=input_ids,
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

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [rows, hidden] -> [rows, vocab]
        return self.lm_head(hidden).float()

    def prefill(self, batch: PrefillBatch) -> torch.Tensor:
        """Run new prompts; return next-token logits [rows, vocab] float32."""
        rows = len(batch.prompts)
        lengths = torch.tensor([len(p) for p in batch.prompts], device=self.device)
        width = int(lengths.max())
        self.cache.ensure_capacity(width)
        input_ids = torch.full(
            (rows, width), self.pad_token_id, dtype=torch.long, device=self.device
        )
        for i, prompt in enumerate(batch.prompts):
            input_ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        columns = torch.arange(width, device=self.device)
        allowed = (columns[None, :] <= columns[:, None])[None] & (
            columns[None, None, :] < lengths[:, None, None]
        )  # [rows, T, T]: causal, and no attending to padding
        mask = self._additive(allowed[:, None])
        hidden = self._forward(
            input_ids,
            columns.expand(rows, width),
            mask,
            StepLayout(batch.row_start, rows, None, width),
            self._routing(batch.slots, width),
        )
        last = hidden[torch.arange(rows, device=self.device), lengths - 1]
        return self._logits(last)

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """Advance every running row by one token; return logits [rows, vocab] float32."""
        rows = len(batch.tokens)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=self.device)
        kv_length = max(batch.positions) + 1
        self.cache.ensure_capacity(kv_length)
        columns = torch.arange(kv_length, device=self.device)
        allowed = columns[None, :] <= positions[:, None]  # [rows, kv_length]
        hidden = self._forward(
            torch.tensor(batch.tokens, dtype=torch.long, device=self.device)[:, None],
            positions[:, None],
            self._additive(allowed[:, None, None]),
            StepLayout(0, rows, positions, kv_length),
            self._routing(batch.slots, 1),
        )
        return self._logits(hidden[:, -1])

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
