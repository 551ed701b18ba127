"""Issue 27: `loramux train --trainable-tokens` (and `--dora`) make adapters that
`AutoPeftModelForCausalLM` loads and that the server serves with the same greedy output.

Two tiny QLoRA runs (NF4 base, a few steps at batch 2) on the decisive tiny Llama (its
greedy choices are clear; it ties lm_head to its embedding, so the trained rows score their
tokens too). The reference is the adapter folder as AutoPeftModelForCausalLM loads it, with
its base's linear weights set to the NF4 weights dequantised (the served base's weights;
PEFT's DoRA on bitsandbytes' own 4-bit layers is not the reference: docs/api.md, DoRA).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import engine_with_adapters, peft_generate, tokens_before_parting
from safetensors.torch import load_file
from trainer_helpers import tiny_settings, write_task

from loramux.core.errors import InvalidArgument
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.engine import Engine
from loramux.server.requests import GenerationRequest, SamplingParams
from loramux.trainer import cli
from loramux.trainer.options import TrainOptions
from loramux.trainer.train import train, trainable_token_ids

pytestmark = pytest.mark.slow

MARKERS = ["<|im_start|>", "<|im_end|>"]
NEW_TOKENS = 12
PROMPTS = ["Code for item 3?", "Code for item 250?"]
DELTA = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _train(resolved: ResolvedModel, root: Path, **options: Any) -> Path:
    result = train(
        TrainOptions(
            train_file=write_task(root / "train.jsonl", 8),
            output_dir=root / "adapter",
            max_steps=3,
            batch_size=2,
            grad_accum=1,
            max_seq_len=64,
            learning_rate=5e-2,  # a few steps must move the rows and matrices visibly
            rank=4,
            progress_bar=False,
            **options,
        ),
        tiny_settings(resolved),
        echo=None,
    )
    assert not result.interrupted and result.steps == 3
    return result.output_dir


@pytest.fixture(scope="module")
def adapters(
    tmp_path_factory: pytest.TempPathFactory, decisive_tiny_llama: ResolvedModel
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained-tokens")
    (root / "tokens").mkdir()
    (root / "dora").mkdir()
    return {
        "tokens": _train(decisive_tiny_llama, root / "tokens", trainable_tokens=MARKERS),
        "dora": _train(decisive_tiny_llama, root / "dora", use_dora=True),
    }


@pytest.fixture(scope="module")
def engine(decisive_tiny_llama: ResolvedModel, adapters: dict[str, Path]) -> Iterator[Engine]:
    engine = engine_with_adapters(decisive_tiny_llama, adapters, max_batch_size=8)
    yield engine
    engine.shutdown()


def _auto_peft(folder: Path, resolved: ResolvedModel) -> Any:
    """AutoPeftModelForCausalLM on the adapter folder (it finds the base by the folder's
    base_model_name_or_path), its base linear layers then holding the NF4 weights
    dequantised: the weights the server computes with."""
    import bitsandbytes as bnb
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    nf4 = load_base_model(resolved, "nf4", "cpu")
    base = model.get_base_model()
    for name, module in nf4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            layer = base.get_submodule(name)
            getattr(layer, "base_layer", layer).weight.data.copy_(weight)
    model.eval()
    return model


def test_trained_adapters_serve_as_auto_peft_loads_them(
    engine: Engine, adapters: dict[str, Path], decisive_tiny_llama: ResolvedModel
) -> None:
    """Both trained adapters and the base, both prompts, in one running batch: the greedy
    tokens of AutoPeftModelForCausalLM's model, parting only at its own near-ties."""
    prompts = [engine.render_chat([("user", p)]) for p in PROMPTS]
    names: list[str | None] = [*adapters, None]
    streams = {
        (name, p): engine.submit(
            GenerationRequest(
                f"{name}-{p}", ids, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), name
            )
        )
        for name in names
        for p, ids in enumerate(prompts)
    }
    got = {key: [t for e in stream for t in e.token_ids] for key, stream in streams.items()}
    for name, folder in adapters.items():
        model = _auto_peft(folder, decisive_tiny_llama)
        for adapter in (name, None):
            for p, ids in enumerate(prompts):
                want, ties = peft_generate(model, ids, "default" if adapter else None, NEW_TOKENS)
                tokens_before_parting(got[adapter, p], want, ties, (adapter, p))
                if adapter is not None:  # the adapter changes the output: the test can fail
                    base, _ = peft_generate(model, ids, None, NEW_TOKENS)
                    assert want != base, (name, p)


def test_the_rows_were_trained_and_the_card_says_so(
    adapters: dict[str, Path], decisive_tiny_llama: ResolvedModel
) -> None:
    import json

    folder = adapters["tokens"]
    config = json.loads((folder / "adapter_config.json").read_text())
    ids = load_tokenizer(decisive_tiny_llama).convert_tokens_to_ids(MARKERS)
    assert config["trainable_token_indices"] == ids
    rows = load_file(str(folder / "adapter_model.safetensors"))[DELTA].float()
    base = load_base_model(decisive_tiny_llama, "nf4", "cpu").get_input_embeddings().weight
    assert rows.shape == (2, base.shape[1])
    assert not torch.allclose(rows, base[ids].float(), atol=1e-3)  # training moved them
    card = (folder / "README.md").read_text()
    assert "| trainable tokens | `<|im_start|>`, `<|im_end|>` |" in card
    assert "| DoRA | yes |" in (adapters["dora"] / "README.md").read_text()


def test_flag_and_token_resolution(decisive_tiny_llama: ResolvedModel) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "d.jsonl", "-o", "out", "--trainable-tokens", "<|im_start|>,<|im_end|>,7"]
    )
    options = cli._options(args)
    assert options.trainable_tokens == ["<|im_start|>", "<|im_end|>", "7"]
    assert cli._options(parser.parse_args(["train", "d.jsonl", "-o", "out"])).trainable_tokens == []
    tokenizer = load_tokenizer(decisive_tiny_llama)
    ids = trainable_token_ids(options.trainable_tokens, tokenizer, len(tokenizer))
    assert ids == [*tokenizer.convert_tokens_to_ids(MARKERS), 7]
    for bad, message in (
        (["not one token at all"], "not one token"),
        ([str(len(tokenizer))], "outside the vocabulary"),
        (["<|im_end|>", str(ids[1])], "twice"),
    ):
        with pytest.raises(InvalidArgument, match=message) as info:
            trainable_token_ids(bad, tokenizer, len(tokenizer))
        assert info.value.field == "trainable_tokens"
