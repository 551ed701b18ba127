"""Packing: a batch's examples share rows instead of each being padded to the longest.

Short chat examples of varied length waste most of a padded batch on padding tokens, which
cost the same compute as real ones. Packed, the examples of a batch are laid end to end in
as few rows of at most ``row_len`` tokens as fit (balanced, longest first), and:

* ``position_ids`` restart at 0 for every example, and no ``attention_mask`` is passed:
  attention is kept inside each example, so an example sees exactly what it would see
  alone, at the same positions. The trainer runs packed rows through its varlen attention
  (`loramux.trainer.attention`: causal SDPA per example, no mask), and gives the collator
  a ``row_len`` that fits the whole batch in one row; with stock transformers attention,
  the segments come from the restarts too (``masking_utils.find_packed_sequence_indices``:
  a block-diagonal mask for sdpa/eager, varlen kernels for flash attention);
* no KV cache is made (``use_cache=False``): transformers skips that detection when one is;
* the first label of every example is ignored, so no token is trained to predict the next
  example's first token; every other label is the example's own (its loss mask intact).

A batch holds the same examples as without packing, so steps, the loss (averaged over the
same target tokens) and the learning curve are unchanged; only padding is gone. Rows that
need padding (more than one row) end in a segment of their own that carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loramux.trainer.data import IGNORE_INDEX


class PackingCollator:
    """Collates tokenised examples (`input_ids`, `labels`) into packed rows for `Trainer`."""

    def __init__(self, pad_token_id: int, row_len: int, pad_to_multiple_of: int = 8) -> None:
        self.pad_token_id = pad_token_id
        self.row_len = row_len
        self.pad_to_multiple_of = pad_to_multiple_of

    def rows(self, lengths: Sequence[int]) -> list[list[int]]:
        """Example indices per row: as few rows as fit in `row_len` tokens, balanced (each
        example, longest first, goes to the emptiest row), since every row is padded to the
        longest. An example longer than a row gets a row of its own."""
        total = sum(lengths)
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        count = max(1, -(-total // self.row_len))
        while True:
            rows: list[list[int]] = [[] for _ in range(count)]
            sizes = [0] * count
            for index in order:
                r = sizes.index(min(sizes))
                rows[r].append(index)
                sizes[r] += lengths[index]
            fits = all(
                size <= self.row_len or len(row) == 1 for row, size in zip(rows, sizes, strict=True)
            )
            if fits or count >= len(lengths):
                return [row for row in rows if row]
            count += 1

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids_rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        position_rows: list[list[int]] = []
        for row in self.rows([len(f["input_ids"]) for f in features]):
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for index in row:
                example_ids = list(features[index]["input_ids"])
                example_labels = list(features[index]["labels"])
                ids += example_ids
                labels += [IGNORE_INDEX, *example_labels[1:]]
                positions += range(len(example_ids))
            ids_rows.append(ids)
            label_rows.append(labels)
            position_rows.append(positions)
        width = max(len(r) for r in ids_rows)
        if len(ids_rows) > 1 and self.pad_to_multiple_of > 1:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        for ids, labels, positions in zip(ids_rows, label_rows, position_rows, strict=True):
            pad = width - len(ids)
            ids += [self.pad_token_id] * pad
            labels += [IGNORE_INDEX] * pad
            positions += range(pad)  # a segment of its own: attends to nothing real
        return {
            "input_ids": torch.tensor(ids_rows, dtype=torch.long),  # [rows, width]
            "labels": torch.tensor(label_rows, dtype=torch.long),  # [rows, width]
            "position_ids": torch.tensor(position_rows, dtype=torch.long),  # [rows, width]
            # With a KV cache transformers does not look for packed segments (it would let
            # the examples attend to each other); training never needs a cache.
            "use_cache": False,
        }
