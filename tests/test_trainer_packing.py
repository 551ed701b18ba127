"""Issue 15 (4): packing puts several examples in one row with the same loss as padding.

The reference is the model itself on the padded batch (transformers' padding path): packed,
every example must get the same logits at its own tokens (positions restart, no attention
across examples) and the batch the same loss (loss mask intact).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_settings

from loramux.core.models import ResolvedModel, load_tokenizer
from loramux.trainer.callbacks import read_metrics
from loramux.trainer.data import IGNORE_INDEX, Example, Tokenizer
from loramux.trainer.options import TrainOptions
from loramux.trainer.packing import PackingCollator
from loramux.trainer.train import train


def _examples(tiny: ResolvedModel) -> list[dict[str, list[int]]]:
    tok = Tokenizer(load_tokenizer(tiny), max_seq_len=256)
    items = []
    for i, words in enumerate((1, 9, 3, 20, 5, 2)):  # varied lengths, as short chats have
        messages = (("user", f"Question {i}: " + "word " * words), ("assistant", f"Reply {i}."))
        ids, labels = tok.encode(Example(f"t:{i}", messages=messages))
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return items


def test_rows_restart_positions_and_mask_each_first_label(tiny_llama: ResolvedModel) -> None:
    items = _examples(tiny_llama)
    lengths = [len(x["input_ids"]) for x in items]
    collator = PackingCollator(pad_token_id=0, row_len=max(lengths) + min(lengths))
    batch = collator(items)
    rows = collator.rows(lengths)
    assert 1 < len(rows) < len(items)  # several examples per row, more than one row
    assert sorted(i for row in rows for i in row) == list(range(len(items)))
    assert all(sum(lengths[i] for i in row) <= collator.row_len for row in rows)
    assert "attention_mask" not in batch  # the segments come from the position ids
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            n = lengths[index]
            assert batch["position_ids"][r, start : start + n].tolist() == list(range(n))
            assert batch["input_ids"][r, start : start + n].tolist() == items[index]["input_ids"]
            assert batch["labels"][r, start].item() == IGNORE_INDEX
            assert (
                batch["labels"][r, start + 1 : start + n].tolist() == (items[index]["labels"][1:])
            )
            start += n
        assert (batch["labels"][r, start:] == IGNORE_INDEX).all()  # padding carries no loss


@pytest.mark.parametrize("row_len", [4096, 48], ids=["one-row", "several-rows"])
def test_packed_loss_and_logits_equal_padded(tiny_llama: ResolvedModel, row_len: int) -> None:
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama.path), dtype=torch.float32)
    model.eval()
    tokenizer = load_tokenizer(tiny_llama)
    items = _examples(tiny_llama)
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        [dict(x) for x in items]
    )
    collator = PackingCollator(int(tokenizer.pad_token_id), row_len=row_len)
    packed = collator(items)
    with torch.inference_mode():
        reference = model(**padded)
        got = model(**packed)
    torch.testing.assert_close(got.loss, reference.loss, rtol=1e-5, atol=1e-6)
    rows = collator.rows([len(x["input_ids"]) for x in items])
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            n = len(items[index]["input_ids"])
            alone = reference.logits[index, :n]  # right padding: the example's own positions
            packed_logits = got.logits[r, start : start + n]
            torch.testing.assert_close(packed_logits, alone, rtol=1e-4, atol=1e-4)
            start += n


def test_training_with_packing_follows_the_padded_run(
    tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    """On the 4-bit base through `train`: same batches, so the same first-step loss."""
    from trainer_helpers import write_task

    losses = {}
    for packing in (False, True):
        options = TrainOptions(
            train_file=write_task(tmp_path / "t.jsonl", 8),
            output_dir=tmp_path / f"packing-{packing}",
            max_steps=2,
            batch_size=4,
            grad_accum=1,
            lora_dropout=0.0,
            logging_steps=1,
            packing=packing,
            progress_bar=False,
            eval_before_training=False,
        )
        result = train(options, tiny_settings(tiny_llama), echo=None)
        assert result.steps == 2
        records = read_metrics(result.output_dir / "metrics.jsonl")
        losses[packing] = [r["loss"] for r in records if "loss" in r]
    assert losses[True][0] == pytest.approx(losses[False][0], rel=5e-3)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=5e-3)
