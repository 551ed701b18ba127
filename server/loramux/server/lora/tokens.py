"""Trainable tokens (PEFT's `trainable_token_indices`): an adapter's own embedding rows.

PEFT's TrainableTokensLayer does not add a delta: it replaces rows of the embedding matrix
(`W.index_copy(0, token_indices, trainable_tokens_delta)`), and where the model ties its
output layer to the embedding (`tie_word_embeddings`) the same replaced matrix also scores
those tokens in the logits. Merging is not an option on a shared base, so the rows are kept
per slot here and swapped in for the rows of the batch whose slot holds them: in the input
embeddings of every pass (prefill, decode, mixed) and, when tied, in the logit columns of
those tokens. Rows of other adapters and of the base model never see them.

The engine thread is the only reader and writer (installs happen between passes, as for
the LoRA slots), so no lock.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from loramux.server.adapters import EmbeddingShape, TokenRows


def embedding_shape(model: Any, max_rows: int) -> EmbeddingShape:
    """The model's input embedding as adapters' trainable tokens are checked against it."""
    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    rows, hidden = embedding.weight.shape
    return EmbeddingShape(name=name, vocab=int(rows), hidden=int(hidden), max_rows=max_rows)


class TokenTable:
    """The device copies of the loaded adapters' token rows, by slot."""

    def __init__(self, model: Any, device: torch.device) -> None:
        embedding = model.get_input_embeddings()
        self.embedding = embedding
        self.device = device
        self.dtype: torch.dtype = embedding.weight.dtype
        # Gemma-style embeddings multiply by a constant in their forward; PEFT's layer applies
        # it to the replaced rows too (TrainableTokensLayer._get_embed_scale).
        self.embed_scale: torch.Tensor | None = getattr(embedding, "embed_scale", None)
        output = model.get_output_embeddings()
        # As PEFT decides it: the config's tie_word_embeddings (utils/other.py); checked
        # against the modules so that a head that is not the embedding is never patched.
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False)) and (
            output is not None and getattr(output, "weight", None) is embedding.weight
        )
        self.head_bias: torch.Tensor | None = getattr(output, "bias", None) if self.tied else None
        self._slots: dict[int, TokenRows] = {}

    def install(self, slot: int, tokens: TokenRows | None) -> None:
        if tokens is None:
            self._slots.pop(slot, None)
            return
        self._slots[slot] = TokenRows(
            tokens.ids.to(self.device), tokens.rows.to(device=self.device, dtype=self.dtype)
        )

    def forget(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def nbytes(self, slot: int) -> int:
        tokens = self._slots.get(slot)
        return 0 if tokens is None else tokens.nbytes

    def active(self, slots: list[int]) -> list[int]:
        """The slots among `slots` that bring token rows (usually none: nothing to do)."""
        return sorted({s for s in slots if s in self._slots})

    def embed(
        self,
        input_ids: torch.Tensor,  # [rows, T] int64
        token_slots: list[int],  # [rows * T] or [rows]: each token's (or row's) adapter slot
    ) -> torch.Tensor:  # [rows, T, hidden]: the embedding's output with the slots' rows
        embeds = self.embedding(input_ids)
        slots = torch.tensor(token_slots, dtype=torch.long, device=input_ids.device)
        slots = slots.view(input_ids.shape[0], -1)  # [rows, T] or [rows, 1]
        for slot in self.active(token_slots):
            tokens = self._slots[slot]
            where, local = self._lookup(tokens, input_ids)
            where &= slots == slot
            if not bool(where.any()):
                continue
            rows = tokens.rows[local[where]]
            if self.embed_scale is not None:
                rows = rows * self.embed_scale.to(rows.dtype)
            embeds[where] = rows.to(embeds.dtype)
        return embeds

    def patch_logits(
        self,
        logits: torch.Tensor,  # [rows, vocab]: the output layer's, before the logit transform
        hidden: torch.Tensor,  # [rows, hidden]: what it was computed from
        row_slots: list[int],  # [rows]
    ) -> torch.Tensor:  # [rows, vocab], the slots' token columns from their own rows
        """Tied models only: a row's logits of its adapter's tokens, from the replaced rows
        (as F.linear over PEFT's merged weight computes them)."""
        if not self.tied:
            return logits
        for slot in self.active(row_slots):
            tokens = self._slots[slot]
            rows = torch.tensor(
                [i for i, s in enumerate(row_slots) if s == slot],
                dtype=torch.long,
                device=logits.device,
            )
            bias = None if self.head_bias is None else self.head_bias[tokens.ids]
            columns = F.linear(hidden[rows], tokens.rows, bias)  # [n rows, n tokens]
            logits[rows[:, None], tokens.ids[None, :]] = columns.to(logits.dtype)
        return logits

    @staticmethod
    def _lookup(
        tokens: TokenRows, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [rows, T] bool (a token of the adapter), int64
        local = torch.searchsorted(tokens.ids, input_ids).clamp_(max=tokens.ids.numel() - 1)
        return tokens.ids[local] == input_ids, local
