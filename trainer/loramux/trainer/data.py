"""Training data: JSONL records checked line by line, rendered and tokenised with loss masks.

Two record shapes are accepted, one JSON object per line:

* ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``, rendered
  with the base model's chat template (the same template the server applies to chat requests,
  so an adapter sees at serving time exactly the text it was trained on);
* ``{"prompt": "...", "completion": "..."}``, used as raw text by default (prompt, then the
  completion and the end-of-sequence token), or as one user turn and one assistant reply with
  ``prompt_format="chat"``.

Only assistant (or completion) tokens carry a loss by default: the adapter learns to answer,
not to predict the user's questions. A bad record is reported as ``file:line: reason`` and
stops the run before any weights are loaded, unless the caller asked to skip bad records.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramux.core.errors import InvalidArgument

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
PROMPT_FORMATS = ("raw", "chat")
IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)
MAX_REPORTED_BAD_RECORDS = 20


class DataError(InvalidArgument):
    """Training data that cannot be used; `field` names the file option (train_file, ...)."""


@dataclass(frozen=True)
class Example:
    """One checked record; exactly one of `messages` or (`prompt`, `completion`) is set."""

    source: str  # "file:line", for messages about this record
    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    completion: str | None = None


@dataclass(frozen=True)
class BadRecord:
    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class DataStats:
    """What went into training, for the summary and the model card."""

    file: str
    records: int = 0  # non-blank lines read
    skipped_bad_records: int = 0
    examples: int = 0  # examples kept after tokenisation
    chat_examples: int = 0
    completion_examples: int = 0
    truncated: int = 0  # examples cut to max_seq_len
    dropped_no_target: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    target_tokens: int = 0  # tokens that carry a loss
    max_tokens: int = 0

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.examples if self.examples else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean_tokens"] = round(self.mean_tokens, 1)
        return data


@dataclass
class TokenizedSet:
    """A list-backed dataset of `input_ids`/`attention_mask`/`labels` dicts for `Trainer`."""

    items: list[dict[str, list[int]]]
    stats: DataStats

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


@dataclass
class PreparedData:
    train: TokenizedSet
    eval: TokenizedSet | None
    bad_records: list[BadRecord] = field(default_factory=list)


def parse_record(obj: Any) -> Example:
    """Check one decoded JSON value; raises ValueError with a reason naming the bad key."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Example(source="", messages=_parse_messages(obj["messages"]))
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise ValueError(f"'{key}' is missing (prompt/completion records need both)")
            if not isinstance(obj[key], str):
                raise ValueError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
        if not obj["completion"].strip():
            raise ValueError("'completion' is empty: there is nothing to learn")
        return Example(source="", prompt=obj["prompt"], completion=obj["completion"])
    raise ValueError("expected a 'messages' list or 'prompt' and 'completion' strings")


def _parse_messages(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty list")
    messages: list[tuple[str, str]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        messages.append((role, content))
    if not any(role == "assistant" and content.strip() for role, content in messages):
        raise ValueError("no non-empty assistant message: there is nothing to learn")
    return tuple(messages)


def read_jsonl(path: Path) -> tuple[list[Example], list[BadRecord], int]:
    """All records of a JSONL file: the good ones, the bad ones, and the count of records read."""
    if not path.is_file():
        raise DataError("train_file", f"{path} is not a file")
    examples: list[Example] = []
    bad: list[BadRecord] = []
    records = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            records += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad.append(BadRecord(path, number, "not UTF-8 text"))
                continue
            except json.JSONDecodeError as exc:
                bad.append(
                    BadRecord(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})")
                )
                continue
            try:
                example = parse_record(obj)
            except ValueError as exc:
                bad.append(BadRecord(path, number, str(exc)))
                continue
            examples.append(
                Example(f"{path}:{number}", example.messages, example.prompt, example.completion)
            )
    return examples, bad, records


Encoded = tuple[Example, list[int], list[int]]  # example, input ids, labels


class Tokenizer:
    """Renders examples to token ids and labels for one tokenizer and one set of choices.

    The prompt part of every example is tokenised by ``loramux.core.prompts.PromptEncoder``,
    the very code the server uses for the same text or chat, so the ids an adapter is trained
    on are the ids it is fed when served (BOS included or not, chat template and all).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_seq_len: int,
        prompt_format: str = "raw",
        train_on_prompt: bool = False,
    ) -> None:
        from loramux.core.prompts import PromptEncoder

        if prompt_format not in PROMPT_FORMATS:
            raise InvalidArgument("prompt_format", f"must be one of {', '.join(PROMPT_FORMATS)}")
        if max_seq_len < 8:
            raise InvalidArgument("max_seq_len", f"must be >= 8, got {max_seq_len}")
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer)
        self.max_seq_len = max_seq_len
        self.prompt_format = prompt_format
        self.train_on_prompt = train_on_prompt
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """(input_ids, labels) before truncation; ValueError for a record it cannot render."""
        if example.messages is None and self.prompt_format == "chat":
            assert example.prompt is not None and example.completion is not None
            example = Example(
                example.source,
                messages=(("user", example.prompt), ("assistant", example.completion)),
            )
        if example.messages is not None:
            ids, labels = self._encode_chat(example.messages)
        else:
            assert example.prompt is not None and example.completion is not None
            ids, labels = self._encode_completion(example.prompt, example.completion)
        return ids, (list(ids) if self.train_on_prompt else labels)

    def _encode_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """The served prompt's ids, then the completion's and the end-of-sequence token.

        Prompt and completion are tokenised together when that leaves the prompt's own ids
        intact (the completion then reads as the model would write it), else one after the
        other; either way the prompt part is exactly what the server feeds for `prompt`.
        """
        prompt_ids = self.prompts.text(prompt)
        joint = self.prompts.text(prompt + completion)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            reply = joint[len(prompt_ids) :]
        else:
            reply = self.prompts.continuation(completion)
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            reply.append(int(eos))
        return prompt_ids + reply, [IGNORE_INDEX] * len(prompt_ids) + reply

    def _encode_chat(self, messages: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids of the conversation; labels on the assistant replies only.

        Built turn by turn in token space: before each assistant reply, the ids are exactly
        what the server feeds for the conversation so far (with the generation prompt); the
        reply is what the full rendering adds after that, through its end-of-turn token (so
        the adapter learns to stop), and nothing the template appends after it.
        """
        if not self.has_chat_template:
            raise ValueError(
                "the base model has no chat template; use prompt/completion records instead"
            )
        ids: list[int] = []
        labels: list[int] = []
        eos = self.tokenizer.eos_token_id
        for i, (role, content) in enumerate(messages):
            if role != "assistant" or not content.strip():
                continue
            before = self.prompts.chat(messages[:i], add_generation_prompt=True) if i else []
            through = self.prompts.chat(messages[: i + 1], add_generation_prompt=False)
            if before[: len(ids)] != ids or through[: len(before)] != before:
                raise ValueError(
                    "the chat template does not render this conversation incrementally, so the "
                    "assistant replies cannot be located"
                )
            reply = through[len(before) :]
            if eos is not None and eos in reply:  # stop after the end-of-turn token
                reply = reply[: len(reply) - reply[::-1].index(eos)]
            labels += [IGNORE_INDEX] * (len(before) - len(ids)) + reply
            ids = before + reply
        full = self.prompts.chat(messages, add_generation_prompt=False)
        if full[: len(ids)] != ids:
            raise ValueError(
                "the chat template does not render this conversation incrementally, so the "
                "assistant replies cannot be located"
            )
        labels += [IGNORE_INDEX] * (len(full) - len(ids))
        return full, labels

    def finish(self, encoded: Sequence[Encoded], stats: DataStats) -> list[dict[str, list[int]]]:
        """Truncate and count; examples left without a target are dropped (and counted)."""
        items: list[dict[str, list[int]]] = []
        for example, ids, labels in encoded:
            if len(ids) > self.max_seq_len:
                ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
                stats.truncated += 1
            targets = sum(1 for label in labels if label != IGNORE_INDEX)
            if targets == 0:
                stats.dropped_no_target += 1
                continue
            items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
            stats.examples += 1
            if example.messages is not None:
                stats.chat_examples += 1
            else:
                stats.completion_examples += 1
            stats.tokens += len(ids)
            stats.target_tokens += targets
            stats.max_tokens = max(stats.max_tokens, len(ids))
        return items


def _raise_bad(option: str, bad: list[BadRecord]) -> None:
    shown = "\n  ".join(str(b) for b in bad[:MAX_REPORTED_BAD_RECORDS])
    more = len(bad) - MAX_REPORTED_BAD_RECORDS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise DataError(
        option,
        f"{len(bad)} bad record(s), training not started (pass --skip-bad-records to skip them):"
        f"\n  {shown}{tail}",
    )


def _load_examples(
    path: Path, option: str, tok: Tokenizer, skip_bad_records: bool
) -> tuple[list[Encoded], DataStats, list[BadRecord]]:
    try:
        examples, bad, records = read_jsonl(path)
    except DataError as exc:
        raise DataError(option, exc.message) from None
    # Rendering problems (e.g. a template that cannot place replies) are bad records too.
    encoded: list[Encoded] = []
    for example in examples:
        try:
            ids, labels = tok.encode(example)
        except ValueError as exc:
            file, _, line = example.source.rpartition(":")
            bad.append(BadRecord(Path(file), int(line), str(exc)))
            continue
        encoded.append((example, ids, labels))
    bad.sort(key=lambda b: b.line)
    if bad and not skip_bad_records:
        _raise_bad(option, bad)
    stats = DataStats(file=str(path), records=records, skipped_bad_records=len(bad))
    return encoded, stats, bad


def prepare_data(
    tokenizer: PreTrainedTokenizerBase,
    train_file: Path,
    *,
    eval_file: Path | None = None,
    eval_split: float = 0.0,
    max_seq_len: int = 1024,
    prompt_format: str = "raw",
    train_on_prompt: bool = False,
    skip_bad_records: bool = False,
    seed: int = 42,
) -> PreparedData:
    """Read, check and tokenise the training (and evaluation) data; no model weights needed."""
    if eval_file is not None and eval_split:
        raise InvalidArgument("eval_split", "give either an eval file or --eval-split, not both")
    if not 0.0 <= eval_split < 1.0:
        raise InvalidArgument("eval_split", f"must be in [0, 1), got {eval_split}")
    tok = Tokenizer(
        tokenizer,
        max_seq_len=max_seq_len,
        prompt_format=prompt_format,
        train_on_prompt=train_on_prompt,
    )
    examples, train_stats, bad = _load_examples(train_file, "train_file", tok, skip_bad_records)
    eval_examples: list[Encoded] = []
    eval_stats: DataStats | None = None
    if eval_file is not None:
        eval_examples, eval_stats, eval_bad = _load_examples(
            eval_file, "eval_file", tok, skip_bad_records
        )
        bad += eval_bad
    elif eval_split:
        shuffled = list(examples)
        random.Random(seed).shuffle(shuffled)
        count = max(1, math.ceil(len(shuffled) * eval_split))
        if count >= len(shuffled):
            raise InvalidArgument(
                "eval_split",
                f"{len(shuffled)} example(s) are too few to split off {eval_split:.0%}",
            )
        eval_examples, examples = shuffled[:count], shuffled[count:]
        eval_stats = DataStats(file=f"{train_file} (split {eval_split:g})", records=count)
        train_stats.records -= count
    train = TokenizedSet(tok.finish(examples, train_stats), train_stats)
    if not train.items:
        raise DataError("train_file", f"{train_file}: no usable training examples")
    evaluation = None
    if eval_stats is not None:
        evaluation = TokenizedSet(tok.finish(eval_examples, eval_stats), eval_stats)
        if not evaluation.items:
            raise DataError("eval_file", "no usable evaluation examples")
    return PreparedData(train=train, eval=evaluation, bad_records=bad)
