"""OpenAI's response objects for completions and chat completions, whole or as chunks.

One request may have several choices (a list of prompts, `n` samples each): choice
`index` = prompt index x n + sample index, as OpenAI and vLLM number them. Each choice
gathers its events here; `usage` counts each prompt once (its samples share it) and every
choice's generated tokens.

Logprobs come in OpenAI's two shapes: the legacy completions one (`tokens`,
`token_logprobs`, `top_logprobs` as {token text: logprob} including the chosen token,
`text_offset` into the choice's text) and the chat one (`content`: token, logprob, bytes,
`top_logprobs` as the k most likely). Token texts are each token decoded alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loramux.server.requests import FinishReason, TokenEvent, TokenLogprob
from loramux.server.tools import CallParser, ToolCall

# OpenAI knows "length" and "stop"; an end-of-sequence token is a natural stop.
FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
}

TokenText = Callable[[int], str]  # a token id's text, decoded alone


def finish_reason(event: TokenEvent | None) -> str | None:
    if event is None or event.finish_reason is None:
        return None
    return FINISH_REASONS.get(event.finish_reason, "stop")


@dataclass
class Choice:
    """What one choice has received so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    tokens: int = 0  # generated so far
    offset: int = 0  # characters of logprob token texts streamed so far (text_offset)
    last: TokenEvent | None = None


class ResponseFormat:
    """How one endpoint writes its answer; `id` and `created` are fixed per request.

    `prompts`: per prompt, its token ids and text (echo; usage); `n`: samples per prompt;
    `logprobs`: None, or the alternatives per token the caller asked for.
    """

    object_name = ""
    chunk_object_name = ""

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        include_usage: bool = False,
        continuous_usage: bool = False,
        n: int = 1,
        logprobs: int | None = None,
        token_text: TokenText = str,
    ) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage and include_usage
        self.n = n
        self.logprobs = logprobs
        self.token_text = token_text
        self.choices: dict[int, Choice] = {}
        self.prompt_tokens: dict[int, int] = {}  # per prompt index, from its events

    def _envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(c.tokens for c in self.choices.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def add(self, index: int, event: TokenEvent) -> Choice:
        """Record one choice's event."""
        choice = self.choices.setdefault(index, Choice())
        choice.text.append(event.text)
        choice.logprobs += event.logprobs
        choice.prompt_logprobs += event.prompt_logprobs
        choice.tokens += len(event.token_ids)
        if event.finished:
            choice.tokens = event.completion_tokens
            self.prompt_tokens[index // self.n] = event.prompt_tokens
        choice.last = event
        return choice

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._envelope(self.chunk_object_name, choices)
        if self.continuous_usage:  # vLLM's: the usage so far in every chunk
            body["usage"] = self.usage()
        elif self.include_usage:  # OpenAI: every chunk has `usage`, null until the last one
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict[str, Any]:
        """The extra last chunk of `stream_options.include_usage`: no choices, the usage."""
        body = self._envelope(self.chunk_object_name, [])
        body["usage"] = self.usage()
        return body

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, index: int, event: TokenEvent) -> list[dict[str, Any]]:
        raise NotImplementedError

    def response(self) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        echo: Sequence[tuple[list[int], str]] = (),
        **options: Any,
    ) -> None:
        super().__init__(request_id, model, **options)
        self.echo = list(echo)  # per prompt: its token ids and text (echo: true)

    def _legacy(
        self, entries: Sequence[tuple[int, TokenLogprob | None]], choice: Choice
    ) -> dict[str, Any]:
        """OpenAI's legacy logprobs object for (token id, its logprob) entries."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token_id, scored in entries:
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(choice.offset)
            choice.offset += len(text)
            if scored is None:  # the prompt's first token: nothing before it
                values.append(None)
                tops.append(None)
                continue
            values.append(scored.logprob)
            top = {self.token_text(t): v for t, v in scored.top}
            top.setdefault(text, scored.logprob)
            tops.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _entries(self, scored: Sequence[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
        return [(s.token_id, s) for s in scored]

    def chunks(self, index: int, event: TokenEvent) -> list[dict[str, Any]]:
        choice = self.add(index, event)
        if not event.text and not event.finished and not event.logprobs:
            return []
        logprobs = None
        if self.logprobs is not None:
            logprobs = self._legacy(self._entries(event.logprobs), choice)
        return [
            self.chunk(
                [
                    {
                        "index": index,
                        "text": event.text,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(event),
                    }
                ]
            )
        ]

    def _choice(self, index: int, choice: Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        entries = self._entries(choice.logprobs)
        if self.echo:
            ids, prompt_text = self.echo[index // self.n]
            text = prompt_text + text
            scores = choice.prompt_logprobs or self._first_scores(index)
            if scores:
                entries = list(zip(ids, scores, strict=True)) + entries
        logprobs = None
        if self.logprobs is not None:
            choice.offset = 0
            logprobs = self._legacy(entries, choice)
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(choice.last),
        }

    def _first_scores(self, index: int) -> tuple[TokenLogprob | None, ...]:
        """A prompt's scores, from its first sample (only that one computes them)."""
        first = self.choices.get(index - index % self.n)
        return first.prompt_logprobs if first is not None else ()

    def response(self) -> dict[str, Any]:
        choices = [self._choice(i, self.choices[i]) for i in sorted(self.choices)]
        body = self._envelope(self.object_name, choices)
        body["usage"] = self.usage()
        return body


class ChatFormat(ResponseFormat):
    """Chat answers. With `tool_parser` (tools asked, tool_choice not none), each choice's
    text goes through its own CallParser: calls become `tool_calls` (in a stream, one
    delta per call, sent when the call's close tag arrives, carrying its id, name and
    whole arguments), the rest is content, and a reply with calls that ended naturally
    finishes with "tool_calls"."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        tool_parser: Callable[[], CallParser] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(request_id, model, **options)
        self.tool_parser = tool_parser
        self.parsers: dict[int, CallParser] = {}

    def _parser(self, index: int) -> CallParser | None:
        if self.tool_parser is None:
            return None
        if index not in self.parsers:
            self.parsers[index] = self.tool_parser()
        return self.parsers[index]

    def _content(self, scored: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """OpenAI's chat logprobs object (None when not asked)."""
        if self.logprobs is None:
            return None

        def entry(token_id: int, value: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(s.token_id, s.logprob), "top_logprobs": [entry(t, v) for t, v in s.top]}
                for s in scored
            ]
        }

    def _delta(self, index: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    def _reason(self, index: int, event: TokenEvent | None) -> str | None:
        """OpenAI's finish reason: "tool_calls" for a reply with calls that was not cut."""
        reason = finish_reason(event)
        parser = self.parsers.get(index)
        if reason == "stop" and parser is not None and parser.calls:
            return "tool_calls"
        return reason

    def first_chunks(self) -> list[dict[str, Any]]:
        return [
            self.chunk([self._delta(i, {"role": "assistant", "content": ""}, None)])
            for i in range(self.n)
        ]

    def chunks(self, index: int, event: TokenEvent) -> list[dict[str, Any]]:
        self.add(index, event)
        parser = self._parser(index)
        if parser is not None:
            return self._tool_chunks(index, event, parser)
        out = []
        if event.text or event.logprobs:
            delta = self._delta(index, {"content": event.text}, None)
            delta["logprobs"] = self._content(event.logprobs)
            out.append(self.chunk([delta]))
        if event.finished:  # as OpenAI: a last chunk with an empty delta and the reason
            out.append(self.chunk([self._delta(index, {}, finish_reason(event))]))
        return out

    def _tool_chunks(
        self, index: int, event: TokenEvent, parser: CallParser
    ) -> list[dict[str, Any]]:
        pieces: list[str | ToolCall] = list(parser.feed(event.text))
        if event.finished:
            pieces += parser.finish()
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                delta: dict[str, Any] = {"content": piece}
            else:
                number = parser.calls.index(piece)
                delta = {"tool_calls": [{"index": number, **piece.openai()}]}
            out.append(self.chunk([self._delta(index, delta, None)]))
        if event.finished:
            out.append(self.chunk([self._delta(index, {}, self._reason(index, event))]))
        return out

    def _message(self, index: int) -> dict[str, Any]:
        text = "".join(self.choices[index].text)
        parser = self._parser(index)
        if parser is None:
            return {"role": "assistant", "content": text}
        pieces = parser.feed(text)
        content = "".join(p for p in [*pieces, *parser.finish()] if isinstance(p, str))
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if parser.calls:
            message["tool_calls"] = [call.openai() for call in parser.calls]
        return message

    def response(self) -> dict[str, Any]:
        choices = []
        for i in sorted(self.choices):
            message = self._message(i)
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": self._content(self.choices[i].logprobs),
                    "finish_reason": self._reason(i, self.choices[i].last),
                }
            )
        body = self._envelope(self.object_name, choices)
        body["usage"] = self.usage()
        return body
