"""What callers hand the engine and what they get back.

These are plain Python values, no tensors and no gRPC: the service layer builds a
`GenerationRequest` from a protobuf message, and turns `TokenEvent`s back into protobuf.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loramux.core.errors import InvalidArgument
from loramux.server.constraints.spec import ConstraintSpec

if TYPE_CHECKING:
    from loramux.server.constraints.compiler import CompiledConstraint

MAX_LOGPROBS = 20  # most alternatives per position (top_logprobs, as OpenAI and vLLM)
MAX_LOGIT_BIAS = 300  # most entries in logit_bias (OpenAI's own limit)


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop string or stop token id matched
    EOS = "eos"  # the model's end-of-sequence token
    CANCELLED = "cancelled"  # the caller cancelled
    DEADLINE = "deadline"  # the caller's deadline passed inside the engine
    ERROR = "error"  # the engine failed this request; `TokenEvent.error` says why


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. temperature == 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None  # fixes sampling for reproducible output
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Log-probabilities, from the model's raw distribution (log_softmax of its logits, before
    # temperature, penalties, bias or top-k/top-p; vLLM's default): None asks for none; k
    # gives each token's own and the k most likely alternatives (0..MAX_LOGPROBS).
    logprobs: int | None = None  # of every generated token
    prompt_logprobs: int | None = None  # of every prompt token (the first has none)
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the output before this many
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    include_stop_str_in_output: bool = False  # keep a matched stop string in the text
    # Structured output: the shape the text must have (JSON schema, regex, choice, grammar);
    # compiled off the engine thread into GenerationRequest.grammar (constraints/).
    constraint: ConstraintSpec | None = None

    def validate(self, max_new_tokens_limit: int) -> None:
        """Refuse values that cannot be honoured, naming the field."""
        # 0 new tokens: only prompt scoring (echo with max_tokens 0), as OpenAI allows.
        least = 0 if self.prompt_logprobs is not None else 1
        if not least <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidArgument(
                "max_new_tokens",
                f"must be in {least}..{max_new_tokens_limit}, got {self.max_new_tokens}",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidArgument(name, f"must be in 0..{MAX_LOGPROBS}, got {value}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidArgument(
                "min_tokens", f"must be in 0..max_new_tokens ({self.max_new_tokens})"
            )
        if self.constraint is not None and self.min_tokens:
            # the grammar decides where the output ends; holding EOS back past its end
            # would leave a row with no allowed token
            raise InvalidArgument("min_tokens", "cannot be combined with a structured output")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise InvalidArgument(name, f"must be in [-2, 2], got {value}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidArgument("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
        for token, bias in self.logit_bias:
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise InvalidArgument(f"logit_bias[{token}]", f"must be in [-100, 100], got {bias}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("temperature", f"must be >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0, got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"
            )
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise InvalidArgument("stop", "at most 16 non-empty stop strings of <= 256 chars")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One generation, already tokenised. adapter_id None means the base model alone."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str | None = None
    deadline: float | None = None  # time.monotonic() instant after which the engine stops it
    # Requests share cached KV blocks only within one scope. The service passes the tenant:
    # a prefix hit is visible in time to first token, so one tenant must not be able to
    # probe which prompts another has sent.
    cache_scope: str = ""
    # params.constraint compiled for the engine's tokenizer, by whoever admits the request
    # (GenerationCall.requests); Engine.submit compiles it when missing (then on the caller's
    # thread, still never the engine's).
    grammar: CompiledConstraint | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability at its position and, when asked, the most likely ones."""

    token_id: int
    logprob: float  # log_softmax of the model's raw logits at the previous position
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    """A piece of a request's output: new tokens and their text, or the final word."""

    token_ids: tuple[int, ...]
    text: str  # text delta for token_ids (may lag a token behind to keep UTF-8 whole)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None  # set when finish_reason is ERROR
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token_ids entry, when asked
    # Every prompt token's (None for the first), when asked: on the request's first event.
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @staticmethod
    def merged(events: Sequence[TokenEvent]) -> TokenEvent:
        """Consecutive events of one request as one: their tokens and text in order, the
        last one's finish reason, usage and error (only the last may be finished)."""
        if len(events) == 1:
            return events[0]
        if not events or any(e.finished for e in events[:-1]):
            raise ValueError("merged() takes one or more events, only the last finished")
        last = events[-1]
        return TokenEvent(
            token_ids=tuple(t for e in events for t in e.token_ids),
            text="".join(e.text for e in events),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            error=last.error,
            logprobs=tuple(lp for e in events for lp in e.logprobs),
            prompt_logprobs=tuple(lp for e in events for lp in e.prompt_logprobs),
        )
