"""InferenceService: generation (whole or streamed), model facts, tokenization."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import grpc

from loramux.core.errors import InvalidArgument
from loramux.server.affinity import ROUTE_KEY_METADATA, requested_adapter, weighted_adapters
from loramux.server.aio import LoopGeneration
from loramux.server.constraints.spec import ConstraintSpec
from loramux.server.generation import GenerationCall
from loramux.server.requests import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from loramux.server.rpc.wrapper import Servicer, rpc, time_left
from loramux.server.tenants import Principal
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

DEFAULT_MAX_NEW_TOKENS = 64
FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
}


def finish_reason(event: TokenEvent) -> pb.FinishReason:
    """The wire value of an event's finish reason (UNSPECIFIED while unfinished)."""
    if event.finish_reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return FINISH_REASONS.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED)


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    """The request's decoding settings, protobuf defaults made explicit (not validated)."""
    sampling = request.sampling
    return SamplingParams(
        max_new_tokens=request.max_new_tokens
        if request.HasField("max_new_tokens")
        else DEFAULT_MAX_NEW_TOKENS,
        temperature=sampling.temperature,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k,
        repetition_penalty=sampling.repetition_penalty
        if sampling.HasField("repetition_penalty")
        else 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
        prompt_logprobs=sampling.prompt_logprobs if sampling.HasField("prompt_logprobs") else None,
        min_tokens=sampling.min_tokens,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logit_bias=tuple(sorted(sampling.logit_bias.items())),
        constraint=constraint_spec(request),
    )


def constraint_spec(request: pb.GenerateRequest) -> ConstraintSpec | None:
    """The request's `constraint` as a spec (checked for size; None when unset)."""
    if not request.HasField("constraint"):
        return None
    constraint = request.constraint
    kind = constraint.WhichOneof("kind")
    field = f"constraint.{kind}"
    if kind == "json_schema":
        return ConstraintSpec.json_schema(constraint.json_schema, field)
    if kind == "json_object":
        return ConstraintSpec.json_object(field) if constraint.json_object else None
    if kind == "regex":
        return ConstraintSpec.regex(constraint.regex, field)
    if kind == "choice":
        return ConstraintSpec.choice(list(constraint.choice.choices), field)
    if kind == "grammar":
        return ConstraintSpec.grammar(constraint.grammar, field)
    return None


class LogprobWriter:
    """TokenLogprobs into their protobuf form, token texts decoded alone."""

    def __init__(self, token_text: Callable[[int], str]) -> None:
        self.token_text = token_text

    def one(self, scored: TokenLogprob) -> pb.TokenLogprob:
        return pb.TokenLogprob(
            token_id=scored.token_id,
            logprob=scored.logprob,
            text=self.token_text(scored.token_id),
            top=[
                pb.TokenLogprob(token_id=t, logprob=v, text=self.token_text(t))
                for t, v in scored.top
            ],
        )

    def many(self, scored: Sequence[TokenLogprob | None]) -> list[pb.TokenLogprob]:
        """The prompt's first token has no logprob: left out (prompt_logprobs[i] is the
        (i + 2)-th prompt token's)."""
        return [self.one(s) for s in scored if s is not None]


class InferenceServicer(Servicer, pb_grpc.InferenceServiceServicer):
    def _prompt(self, request: pb.GenerateRequest | pb.TokenizeRequest) -> list[int]:
        engine = self.state.engine
        which = request.WhichOneof("input")
        if which in ("prompt", "text"):
            text = request.prompt if which == "prompt" else request.text  # type: ignore[union-attr]
            if not text:
                raise InvalidArgument(which, "is empty")
            return engine.tokenize(text)
        if which == "chat":
            return engine.render_chat([(m.role, m.content) for m in request.chat.messages])
        if which == "token_ids":
            ids = list(request.token_ids.ids)  # type: ignore[union-attr]
            if not ids:
                raise InvalidArgument("token_ids", "is empty")
            if any(t >= engine.info.vocab_size for t in ids):
                raise InvalidArgument(
                    "token_ids",
                    f"token id outside the vocabulary (0..{engine.info.vocab_size - 1})",
                )
            return ids
        raise InvalidArgument("input", "give `prompt`, `chat` or `token_ids`")

    def _logprobs(self) -> LogprobWriter:
        tokenizer = self.state.engine.tokenizer
        return LogprobWriter(lambda t: str(tokenizer.decode([t], skip_special_tokens=False)))

    def _generation(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        call: GenerationCall,
        request_id: str,
    ) -> LoopGeneration:
        """The call's generation on the event loop: built (adapter, prompt, parameters) on
        the pool, then its tenant slot, tokens and reader awaited without a thread (aio.py).

        A client that cancels or disconnects at any point cancels the call's task: its
        place in the tenant's wait line is freed at once, its engine row at the next step.
        """
        # The message's adapter, or the one its metadata names for balancers (affinity.py).
        metadata = dict(context.invocation_metadata() or ())
        remaining = time_left(context)
        weighted = weighted_adapters(request, metadata) if request.adapters else None

        def build() -> list[GenerationRequest]:
            return [
                call.request(
                    None if weighted is not None else requested_adapter(request.adapter, metadata),
                    lambda: self._prompt(request),
                    lambda _: sampling_params(request),
                    request_id=request_id,
                    deadline=time.monotonic() + remaining if remaining is not None else None,
                    weighted=weighted,
                )
            ]

        return LoopGeneration(call, build, self.executor)

    @staticmethod
    @asynccontextmanager
    async def _running(call: GenerationCall, run: LoopGeneration) -> AsyncIterator[None]:
        """Started, then closed on every way out (a client gone: its task cancelled)."""
        try:
            await run.start()
            yield
        except BaseException as exc:
            call.cancel()
            run.close(exc)
            raise
        run.close()

    @rpc
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.GenerateResponse:
        call = GenerationCall(self.state, principal, _route_key(context))
        request_id = request.request_id or uuid.uuid4().hex
        run = self._generation(request, context, call, request_id)
        text: list[str] = []
        tokens: list[int] = []
        logprobs: list[TokenLogprob] = []
        prompt_logprobs: list[TokenLogprob | None] = []
        async with self._running(call, run):
            while (item := await run.next()) is not None:
                _, event = item
                text.append(event.text)
                tokens.extend(event.token_ids)
                logprobs += event.logprobs
                prompt_logprobs += event.prompt_logprobs
        writer = self._logprobs()
        return pb.GenerateResponse(
            request_id=request_id,
            text="".join(text),
            token_ids=tokens,
            logprobs=writer.many(logprobs),
            prompt_logprobs=writer.many(prompt_logprobs),
            finish_reason=finish_reason(event),
            usage=pb.Usage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
            ),
        )

    @rpc
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = GenerationCall(self.state, principal, _route_key(context))
        request_id = request.request_id or uuid.uuid4().hex
        run = self._generation(request, context, call, request_id)
        writer = self._logprobs()
        async with self._running(call, run):
            while (item := await run.next()) is not None:
                _, event = item
                message = pb.GenerateStreamResponse(
                    request_id=request_id,
                    text=event.text,
                    token_ids=list(event.token_ids),
                    logprobs=writer.many(event.logprobs),
                    prompt_logprobs=writer.many(event.prompt_logprobs),
                )
                if event.finished:
                    message.finish_reason = finish_reason(event)
                    message.usage.prompt_tokens = event.prompt_tokens
                    message.usage.completion_tokens = event.completion_tokens
                yield message

    @rpc
    def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.ModelInfoResponse:
        info = self.state.engine.info
        return pb.ModelInfoResponse(
            base_model=info.base_model,
            base_model_reference=info.base_model_reference,
            quantization=info.quantization,
            device=info.device,
            context_length=info.context_length,
            max_rank=info.max_rank,
            max_new_tokens_limit=info.max_new_tokens_limit,
            max_batch_size=info.max_batch_size,
            max_loaded_adapters=info.max_loaded_adapters,
            max_upload_bytes=self.state.settings.max_upload_bytes,
            vocab_size=info.vocab_size,
            kv_cache_bytes=info.kv_cache_bytes,
            kv_block_size=info.kv_block_size,
            kv_blocks_total=info.kv_blocks_total,
        )

    @rpc
    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(token_ids=self._prompt(request))


def _route_key(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata()).get(ROUTE_KEY_METADATA)
