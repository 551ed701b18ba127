"""Request bodies of the OpenAI-compatible endpoints, checked by pydantic.

Fields OpenAI defines that LoRAMux cannot honour (logprobs, penalties, tools, n > 1, ...)
are refused with a message naming them when set to anything but their neutral value, never
silently ignored; fields nobody defines are refused too (as OpenAI does). `top_k`,
`repetition_penalty`, `stop_token_ids` and `ignore_eos` are the extensions vLLM accepts,
sent by the openai client through `extra_body`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loramux.core.errors import InvalidArgument

MAX_SEED = 2**64 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _GenerationBody(BaseModel):
    """What both endpoints share: the model, sampling, stopping, streaming."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Accepted and not acted on: they change nothing in what is generated.
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refuse_unsupported(self) -> None:
        """Refuse what would silently differ from OpenAI's meaning, naming the field."""
        if self.n != 1:
            raise InvalidArgument("n", "only n=1 is supported; send separate requests")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise InvalidArgument(
                    name, "is not supported; use `repetition_penalty` (extra_body) instead"
                )
        if self.logit_bias:
            raise InvalidArgument("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options", "is only allowed together with stream=true")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_GenerationBody):
    """POST /v1/completions. `prompt` is one text or one list of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise InvalidArgument("echo", "is not supported")
        if self.best_of not in (None, 1):
            raise InvalidArgument("best_of", "only best_of=1 is supported")
        if self.logprobs is not None:
            raise InvalidArgument("logprobs", "is not supported")
        if self.suffix:
            raise InvalidArgument("suffix", "is not supported")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a text or token ids (a batch of several is refused)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidArgument(
                    "prompt", f"one prompt per request is supported, got {len(prompt)}"
                )
            prompt = prompt[0]
        if not prompt:
            raise InvalidArgument("prompt", "is empty")
        return prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class ChatCompletionBody(_GenerationBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageBody] = Field(max_length=4096)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise InvalidArgument("logprobs", "is not supported")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise InvalidArgument(name, "tool and function calling are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise InvalidArgument(name, "tool and function calling are not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidArgument("response_format", "only type `text` is supported")

    def chat(self) -> list[tuple[str, str]]:
        """(role, text) pairs; OpenAI's `developer` role is the system prompt."""
        return [("system" if m.role == "developer" else m.role, m.text()) for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens
