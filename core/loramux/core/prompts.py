"""Prompt tokenisation shared by the server and the trainer: one rule for both.

An adapter only behaves at serving time as it did in training when it is fed the same token
ids for the same text. Both sides therefore turn text and chats into ids here:

* raw text gets the tokenizer's beginning-of-sequence token when the tokenizer is configured
  to add one (Llama, Mistral: ``add_bos_token``), exactly once, and never an end-of-sequence
  token (a prompt is continued, not finished), as ``transformers``' ``generate`` examples and
  vLLM do;
* chats are rendered by the model's own chat template, whose text already carries any BOS
  (``{{ bos_token }}``), and tokenised without adding special tokens again (no double BOS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PROBE = "a"

# A chat message: (role, text), or a message object as chat templates take it (with
# `tool_calls` or `tool_call_id`, for tool calling).
ChatMessage = tuple[str, str] | Mapping[str, Any]


class PromptEncoder:
    """Text and chats to the token ids a model is fed, for one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        with_special = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
        plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
        # Whether the tokenizer itself puts a BOS in front (probed, since the attribute that
        # says so differs between tokenizer classes and versions).
        self.bos_id: int | None = (
            int(bos)
            if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
            else None
        )

    def text(self, text: str) -> list[int]:
        """A raw prompt's ids: [BOS] + text tokens (BOS only where the tokenizer adds one)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def continuation(self, text: str) -> list[int]:
        """Text that follows other tokens (a completion): never any special token added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """A conversation rendered with the chat template and tokenised as it stands;
        `tools` (OpenAI's tool objects) are rendered by the template too."""
        rendered: Any = self.tokenizer.apply_chat_template(
            [
                dict(m) if isinstance(m, Mapping) else {"role": m[0], "content": m[1]}
                for m in messages
            ],
            tools=[dict(t) for t in tools] if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        return list(self.tokenizer(str(rendered), add_special_tokens=False)["input_ids"])
