"""OpenAI's response objects for completions and chat completions, whole or as chunks."""

from __future__ import annotations

import time
from typing import Any

from loramux.server.requests import FinishReason, TokenEvent

# OpenAI knows "length" and "stop"; an end-of-sequence token is a natural stop.
FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
}


def usage(event: TokenEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def finish_reason(event: TokenEvent) -> str | None:
    if event.finish_reason is None:
        return None
    return FINISH_REASONS.get(event.finish_reason, "stop")


class ResponseFormat:
    """How one endpoint writes its answer; `id` and `created` are fixed per request."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._envelope(self.chunk_object_name, choices)
        if self.include_usage:  # OpenAI: every chunk has `usage`, null until the last one
            body["usage"] = None
        return body

    def usage_chunk(self, event: TokenEvent) -> dict[str, Any]:
        """The extra last chunk of `stream_options.include_usage`: no choices, the usage."""
        body = self._envelope(self.chunk_object_name, [])
        body["usage"] = usage(event)
        return body

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        raise NotImplementedError

    def response(self, text: str, last: TokenEvent) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"

    def _choice(self, text: str, event: TokenEvent) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(event)}

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        if not event.text and not event.finished:
            return []
        return [self.chunk([self._choice(event.text, event)])]

    def response(self, text: str, last: TokenEvent) -> dict[str, Any]:
        body = self._envelope(self.object_name, [self._choice(text, last)])
        body["usage"] = usage(last)
        return body


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _delta(self, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    def first_chunks(self) -> list[dict[str, Any]]:
        return [self.chunk([self._delta({"role": "assistant", "content": ""}, None)])]

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        out = []
        if event.text:
            out.append(self.chunk([self._delta({"content": event.text}, None)]))
        if event.finished:  # as OpenAI: a last chunk with an empty delta and the reason
            out.append(self.chunk([self._delta({}, finish_reason(event))]))
        return out

    def response(self, text: str, last: TokenEvent) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason(last),
        }
        body = self._envelope(self.object_name, [choice])
        body["usage"] = usage(last)
        return body
