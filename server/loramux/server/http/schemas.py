"""Request bodies of the OpenAI-compatible endpoints, checked by pydantic.

Fields OpenAI defines that LoRAMux cannot honour (functions, suffix, best_of > 1, ...) are
refused with a message naming them when set to anything but their neutral value, never
silently ignored; fields nobody defines are refused too (as OpenAI does). `top_k`,
`min_tokens`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, `skip_special_tokens`,
`include_stop_str_in_output` and `stream_options.continuous_usage_stats` are the
extensions vLLM accepts, sent by its clients (the openai client through `extra_body`).
docs/http-api.md lists every field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loramux.core.errors import InvalidArgument
from loramux.server.http.structured import ResponseFormat, StructuredFields
from loramux.server.tools import ToolRequest, parse_request, template_messages

if TYPE_CHECKING:
    from loramux.server.constraints.spec import ConstraintSpec

MAX_SEED = 2**64 - 1
MAX_PROMPTS = 4096  # entries of a list `prompt` (each is also bounded by --max-batch-tokens)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class _GenerationBody(StructuredFields):
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
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    # Accepted and not acted on: they change nothing in what is generated.
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refuse_unsupported(self, max_n: int) -> None:
        """Refuse what would silently differ from OpenAI's meaning, naming the field."""
        if not 1 <= self.n <= max_n:
            raise InvalidArgument("n", f"must be in 1..{max_n} (--max-n), got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options", "is only allowed together with stream=true")
        self.constraint()  # a malformed or oversized constraint: 400 before any work

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias); a key that is not a token id is refused."""
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidArgument(f"logit_bias[{key!r}]", "keys are token ids") from None
            pairs.append((token, value))
        return tuple(pairs)

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per generated token (None: no logprobs)."""
        raise NotImplementedError


class CompletionBody(_GenerationBody):
    """POST /v1/completions. `prompt`: a text, a list of texts, token ids, or a list of
    token-id lists; each is one prompt, with `n` choices."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self, max_n: int) -> None:
        super().refuse_unsupported(max_n)
        if self.echo and self.stream:
            raise InvalidArgument("echo", "is not supported together with stream=true")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidArgument("best_of", "only best_of equal to n (or unset) is supported")
        if self.suffix:
            raise InvalidArgument("suffix", "is not supported")

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """Every prompt, each a text or token ids (refused when the list or one is empty)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[str | list[int]] = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise InvalidArgument("prompt", "is an empty list")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidArgument("prompt", f"at most {MAX_PROMPTS} prompts, got {len(prompts)}")
        for i, one in enumerate(prompts):
            if not one:
                raise InvalidArgument("prompt" if len(prompts) == 1 else f"prompt[{i}]", "is empty")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=65_536)  # JSON text, as OpenAI returns it


class MessageToolCall(BaseModel):
    """A call an earlier assistant turn made (sent back in the next request)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, max_length=256)
    refusal: str | None = None  # in an assistant message the openai client sends back

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


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

    def refuse_unsupported(self, max_n: int) -> None:
        super().refuse_unsupported(max_n)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs", "needs logprobs=true")
        # the legacy fields (deprecated by OpenAI in favour of tools and tool_choice)
        if self.functions:
            raise InvalidArgument("functions", "is not supported; use tools")
        if self.function_call not in (None, "none"):
            raise InvalidArgument("function_call", "is not supported; use tool_choice")
        tools = self.tool_request()
        if tools is not None and tools.calls_parsed:
            if self.logprobs:  # a call's tokens are not content: no place for their logprobs
                raise InvalidArgument("logprobs", "is not supported together with tools")
            found = self.constraint()
            if tools.forced and found is not None:
                raise InvalidArgument(
                    found.field, f"cannot be combined with tool_choice {self.tool_choice!r}"
                )
        self.constraint()

    def tool_request(self) -> ToolRequest | None:
        """`tools`, `tool_choice` and `parallel_tool_calls`, checked (None: no tools)."""
        return parse_request(self.tools, self.tool_choice, self.parallel_tool_calls)

    def requested_constraints(self) -> list[ConstraintSpec]:
        found = super().requested_constraints()
        own = self.response_format.constraint() if self.response_format else None
        return [own, *found] if own is not None else found

    def chat(self) -> list[dict[str, Any]]:
        """The messages as chat templates take them; OpenAI's `developer` role is the system
        prompt, an assistant's earlier tool calls and `tool` results are kept."""
        return template_messages(
            [
                {
                    "role": "system" if m.role == "developer" else m.role,
                    "content": m.text(),
                    "name": m.name,
                    "tool_call_id": m.tool_call_id,
                    "tool_calls": [c.model_dump() for c in m.tool_calls] if m.tool_calls else None,
                }
                for m in self.messages
            ]
        )

    def top_logprobs_asked(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens
