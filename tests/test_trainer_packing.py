"""Issue 15 (4): packing puts several examples in one row with the same loss as padding.

The reference is the model itself on the padded batch (transformers' padding path): packed,
every example must get the same logits at its own tokens (positions restart, no attention
across examples) and the batch the same loss (loss mask intact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import assert_same_gradients, tiny_settings

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


def _padded_and_packed(
    tiny: ResolvedModel, row_len: int
) -> tuple[list[dict[str, list[int]]], Any, Any, list[list[int]]]:
    """The examples, their padded batch (the reference), their packed batch and its rows."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer = load_tokenizer(tiny)
    items = _examples(tiny)
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        [dict(x) for x in items]
    )
    collator = PackingCollator(int(tokenizer.pad_token_id), row_len=row_len)
    rows = collator.rows([len(x["input_ids"]) for x in items])
    return items, padded, collator(items), rows


def _assert_each_example_alone(
    packed_logits: torch.Tensor,  # [rows, row_len, vocab]
    padded_logits: torch.Tensor,  # [examples, longest, vocab]
    items: list[dict[str, list[int]]],
    rows: list[list[int]],
) -> None:
    """Every example's logits in its packed row equal its own (right-padded) row's."""
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            n = len(items[index]["input_ids"])
            torch.testing.assert_close(
                packed_logits[r, start : start + n], padded_logits[index, :n], rtol=1e-4, atol=1e-4
            )
            start += n


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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama.path), dtype=torch.float32)
    model.eval()
    items, padded, packed, rows = _padded_and_packed(tiny_llama, row_len)
    with torch.inference_mode():
        reference = model(**padded)
        got = model(**packed)
    torch.testing.assert_close(got.loss, reference.loss, rtol=1e-5, atol=1e-6)
    _assert_each_example_alone(got.logits, reference.logits, items, rows)


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


# ---- the varlen attention packed rows use (loramux.trainer.attention) ----
def _varlen_model(tiny: ResolvedModel) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from loramux.trainer.attention import AttentionBackend

    model = AutoModelForCausalLM.from_pretrained(str(tiny.path), dtype=torch.float32)
    backend = AttentionBackend.for_packing(True, "cpu")
    assert backend is not None
    backend.apply(model)
    return model


@pytest.mark.parametrize("row_len", [4096, 48], ids=["one-row", "several-rows"])
def test_varlen_packed_logits_and_gradients_equal_each_example_alone(
    tiny_llama: ResolvedModel, row_len: int
) -> None:
    """Reference: the stock sdpa model on the padded batch (each example unpacked). With
    the varlen attention, packed rows give every example its own logits, the same loss,
    and the same LoRA-free gradients as the padded batch."""
    from transformers import AutoModelForCausalLM

    reference_model = AutoModelForCausalLM.from_pretrained(
        str(tiny_llama.path), dtype=torch.float32
    )
    model = _varlen_model(tiny_llama)
    assert model.config._attn_implementation != reference_model.config._attn_implementation
    items, padded, packed, rows = _padded_and_packed(tiny_llama, row_len)
    reference = reference_model(**padded)
    got = model(**packed)
    torch.testing.assert_close(got.loss, reference.loss, rtol=1e-5, atol=1e-6)
    _assert_each_example_alone(got.logits, reference.logits, items, rows)
    reference.loss.backward()
    got.loss.backward()
    assert_same_gradients(model, reference_model, rtol=1e-3, atol=1e-5)


def test_varlen_attention_keeps_examples_apart(tiny_llama: ResolvedModel) -> None:
    """Changing one example's tokens must not move another example's logits in the same
    row (it would, by a wide margin, if attention crossed the boundary), while it does
    move its own."""
    model = _varlen_model(tiny_llama)
    items = _examples(tiny_llama)[:3]
    collator = PackingCollator(pad_token_id=0, row_len=4096)
    batch = collator(items)
    assert batch["input_ids"].shape[0] == 1  # all three in one row
    order = collator.rows([len(x["input_ids"]) for x in items])[0]
    n_first = len(items[order[0]]["input_ids"])
    changed = batch["input_ids"].clone()
    changed[0, 1:n_first] = (changed[0, 1:n_first] + 101) % 1000  # rewrite the first example
    with torch.inference_mode():
        before = model(**batch).logits[0]
        after = model(**{**batch, "input_ids": changed}).logits[0]
    assert (before[1:n_first] - after[1:n_first]).abs().max() > 1e-2  # its own logits moved
    torch.testing.assert_close(after[n_first:], before[n_first:], rtol=0, atol=1e-6)


def test_varlen_with_a_padding_mask_is_the_sdpa_model(tiny_llama: ResolvedModel) -> None:
    """A padded batch (2-D mask) through a model set to the varlen attention is computed as
    the stock sdpa model computes it, left padding included: no mask is dropped."""
    from transformers import AutoModelForCausalLM

    reference_model = AutoModelForCausalLM.from_pretrained(
        str(tiny_llama.path), dtype=torch.float32
    )
    model = _varlen_model(tiny_llama)
    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.padding_side = "left"
    batch = tokenizer(["a short one", "a much longer prompt than the first one is"], padding=True)
    inputs = {k: torch.tensor(v) for k, v in batch.items()}
    assert (inputs["attention_mask"] == 0).any()
    with torch.inference_mode():
        expected = reference_model(**inputs).logits
        got = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
