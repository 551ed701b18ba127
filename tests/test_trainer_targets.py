"""Logits only at trained positions (`TargetLogits`): the same loss and gradients as the
model's own full-logits loss on the same batch, padded or packed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_trainer_packing import _examples
from trainer_helpers import assert_same_gradients
from transformers import DataCollatorForSeq2Seq

from loramux.core.models import ResolvedModel, load_tokenizer
from loramux.trainer.attention import AttentionBackend
from loramux.trainer.data import IGNORE_INDEX
from loramux.trainer.packing import PackingCollator
from loramux.trainer.targets import TargetLogits


def _model(tiny: ResolvedModel, packing: bool) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.path), dtype=torch.float32)
    backend = AttentionBackend.for_packing(packing, "cpu")
    if backend is not None:
        backend.apply(model)
    return model


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_target_logits_give_the_full_logits_loss_and_gradients(
    tiny_llama: ResolvedModel, packing: bool
) -> None:
    tokenizer = load_tokenizer(tiny_llama)
    collator: Any = (
        PackingCollator(int(tokenizer.pad_token_id), row_len=4096)
        if packing
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    )
    items = _examples(tiny_llama)
    full_batch = collator([dict(x) for x in items])
    target_batch = TargetLogits(collator)([dict(x) for x in items])
    reference_model, model = _model(tiny_llama, packing), _model(tiny_llama, packing)
    assert TargetLogits.supported(model)
    reference = reference_model(**full_batch)  # the model's own loss over all logits
    got = model(**target_batch)
    keep = target_batch["logits_to_keep"]
    targets = int((full_batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert got.logits.shape == (targets, reference.logits.shape[-1])  # only the trained ones
    assert targets < full_batch["input_ids"].numel() // 2  # replies are a small share
    torch.testing.assert_close(got.logits, reference.logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, reference.loss, rtol=1e-6, atol=1e-6)
    reference.loss.backward()
    got.loss.backward()
    assert_same_gradients(model, reference_model, rtol=1e-4, atol=1e-6)
