"""Logits only where a loss is taken: the LM head and its cross-entropy skip every other position.

The LM head projects each position onto the whole vocabulary (49,152 entries for SmolLM2,
576×49,152 weights: a fifth of the model's multiply-adds per position), and the loss upcasts
those logits to fp32 for a softmax over the vocabulary. Chat training takes a loss on the
replies only, and padded batches add positions that carry none, so most of that work is
thrown away. `TargetLogits` wraps a collator (padded or packed) and adds, per batch:

* ``logits_to_keep``: a boolean [rows, width] mask of the positions that predict a trained
  label (transformers' ``slice_logits_to_keep`` then runs the LM head on those alone);
* ``shift_labels``: the labels those positions predict, in the same order ([targets]).

transformers' causal-LM loss uses ``shift_labels`` as given, so the loss is the mean (or the
sum over ``num_items_in_batch``) over exactly the same target tokens as before: the same
number, computed on fewer positions. ``labels`` stay in the batch (they make the model
compute a loss, and the Trainer counts items from them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from loramux.trainer.data import IGNORE_INDEX


class TargetLogits:
    """A collator wrapper: logits computed only at positions whose next label is trained."""

    def __init__(self, collator: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator

    @staticmethod
    def supported(model: Any) -> bool:
        """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs)."""
        return "logits_to_keep" in inspect.signature(model.forward).parameters

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.collator(features)
        labels = batch["labels"]  # [rows, width]
        padded = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)  # [rows, width + 1]
        shifted = padded[:, 1:]  # [rows, width]: the label each position predicts
        keep = shifted != IGNORE_INDEX  # [rows, width]
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = shifted[keep]  # [targets]
        return batch
