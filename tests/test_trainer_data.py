"""Issue 5, data: JSONL checks with file:line errors, chat rendering and reply-only loss masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loramux.core.errors import InvalidArgument
from loramux.core.models import ResolvedModel, load_tokenizer
from loramux.trainer.data import IGNORE_INDEX, DataError, prepare_data

CHAT = {
    "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
}
PAIR = {"prompt": "2 + 2 =", "completion": " 4"}


def _write(path: Path, records: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(smollm2: ResolvedModel) -> Any:
    return load_tokenizer(smollm2)


def _targets(tokenizer: Any, item: dict[str, list[int]]) -> str:
    """The text of the tokens that carry a loss."""
    ids = [i for i, label in zip(item["input_ids"], item["labels"], strict=True) if label != -100]
    return str(tokenizer.decode(ids))


def test_chat_records_train_only_on_assistant_replies(tokenizer: Any, tmp_path: Path) -> None:
    data = prepare_data(tokenizer, _write(tmp_path / "t.jsonl", [CHAT]))
    item = data.train.items[0]
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(item["input_ids"]) == rendered  # the model's own chat template
    eos = tokenizer.eos_token
    # Both replies, each with its end-of-turn token (so the adapter learns to stop), nothing else.
    assert _targets(tokenizer, item) == f"Paris.{eos}Rome.{eos}"
    assert item["labels"][: len(item["labels"]) // 3] == [IGNORE_INDEX] * (len(item["labels"]) // 3)
    stats = data.train.stats
    assert (stats.records, stats.examples, stats.chat_examples) == (1, 1, 1)
    assert stats.target_tokens == sum(1 for label in item["labels"] if label != IGNORE_INDEX)


def test_prompt_completion_raw_and_chat(tokenizer: Any, tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", [PAIR])
    raw = prepare_data(tokenizer, path).train.items[0]
    assert tokenizer.decode(raw["input_ids"]) == "2 + 2 = 4" + tokenizer.eos_token
    assert _targets(tokenizer, raw) == " 4" + tokenizer.eos_token
    chat = prepare_data(tokenizer, path, prompt_format="chat").train.items[0]
    assert "<|im_start|>user\n2 + 2 =" in tokenizer.decode(chat["input_ids"])
    assert _targets(tokenizer, chat) == " 4" + tokenizer.eos_token
    everything = prepare_data(tokenizer, path, train_on_prompt=True).train.items[0]
    assert everything["labels"] == everything["input_ids"]


def test_truncation_and_examples_left_without_target(tokenizer: Any, tmp_path: Path) -> None:
    long_prompt = {"prompt": "word " * 40, "completion": " end"}
    long_reply = {"prompt": "Say:", "completion": " many words" * 30}
    data = prepare_data(
        tokenizer, _write(tmp_path / "t.jsonl", [long_prompt, long_reply, PAIR]), max_seq_len=16
    )
    stats = data.train.stats
    assert stats.truncated == 2
    assert stats.dropped_no_target == 1  # the long prompt left no completion token
    assert stats.examples == 2
    assert max(len(item["input_ids"]) for item in data.train.items) == 16


BAD = [
    CHAT,
    "{not json",
    {"messages": [{"role": "bot", "content": "hi"}]},
    {"prompt": "only a prompt"},
    {"messages": [{"role": "user", "content": "hi"}]},
    [1, 2],
    "",
    {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}]},
    PAIR,
]


def test_bad_records_are_reported_with_file_and_line(tokenizer: Any, tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", BAD)
    with pytest.raises(DataError) as caught:
        prepare_data(tokenizer, path)
    error = caught.value
    assert error.field == "train_file"
    message = str(error)
    assert "6 bad record(s), training not started" in message
    for line, reason in [
        (2, "invalid JSON"),
        (3, "messages[0].role must be one of system, user, assistant, got 'bot'"),
        (4, "'completion' is missing"),
        (5, "no non-empty assistant message"),
        (6, "expected a JSON object, got list"),
        (8, "messages[1]: a system message may only come first"),
    ]:
        assert f"{path}:{line}: {reason}" in message
    assert f"{path}:1:" not in message and f"{path}:9:" not in message


def test_skip_bad_records_counts_them(tokenizer: Any, tmp_path: Path) -> None:
    data = prepare_data(tokenizer, _write(tmp_path / "t.jsonl", BAD), skip_bad_records=True)
    assert data.train.stats.skipped_bad_records == 6
    assert data.train.stats.records == 8  # the blank line is not a record
    assert data.train.stats.examples == 2
    assert [b.line for b in data.bad_records] == [2, 3, 4, 5, 6, 8]


def test_eval_split_is_disjoint_and_repeatable(tokenizer: Any, tmp_path: Path) -> None:
    records = [{"prompt": f"item {i}:", "completion": f" {i}"} for i in range(20)]
    path = _write(tmp_path / "t.jsonl", records)
    first = prepare_data(tokenizer, path, eval_split=0.25, seed=3)
    again = prepare_data(tokenizer, path, eval_split=0.25, seed=3)
    assert first.eval is not None and again.eval is not None
    assert len(first.eval) == 5 and len(first.train) == 15
    train_ids = {tuple(item["input_ids"]) for item in first.train.items}
    eval_ids = {tuple(item["input_ids"]) for item in first.eval.items}
    assert not train_ids & eval_ids
    assert eval_ids == {tuple(item["input_ids"]) for item in again.eval.items}
    with pytest.raises(InvalidArgument, match="eval_split"):
        prepare_data(tokenizer, path, eval_split=0.25, eval_file=path)


def test_missing_and_empty_files(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_file"):
        prepare_data(tokenizer, tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="no usable training examples"):
        prepare_data(tokenizer, _write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DataError, match="eval_file"):
        prepare_data(tokenizer, _write(tmp_path / "t.jsonl", [PAIR]), eval_file=tmp_path / "x")


def test_cli_stops_on_bad_data_before_loading_the_model(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", BAD)
    result = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "train", str(path), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, LORAMUX_LOG_LEVEL="WARNING"),
    )
    assert result.returncode == 2, result.stderr
    assert f"{path}:3: messages[0].role" in result.stderr
    assert "--skip-bad-records" in result.stderr
    assert "Loading weights" not in result.stderr  # stopped before the model was loaded
    assert not (tmp_path / "out").exists()
