"""The routes: generation, models, health; authentication and errors as the gRPC side has.

Every generation route authenticates with the same keys (`Authorization: Bearer`), picks
the adapter from `model` within the caller's tenant (an unknown or foreign model is a 404,
never the base model instead), and runs through `GenerationCall`, the same path the gRPC
servicer takes: one tenant gate, one set of metrics, one drain switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from loramux.core.errors import Cancelled, InvalidArgument, LoramuxError, NotFound
from loramux.server.affinity import ROUTE_KEY_METADATA
from loramux.server.constraints.spec import ConstraintSpec
from loramux.server.generation import GenerationCall
from loramux.server.http.bridge import GenerationJob
from loramux.server.http.errors import (
    error_body,
    error_response,
    from_http_exception,
    from_validation,
)
from loramux.server.http.formats import ChatFormat, CompletionFormat, ResponseFormat
from loramux.server.http.schemas import ChatCompletionBody, CompletionBody, _GenerationBody
from loramux.server.requests import GenerationRequest, SamplingParams
from loramux.server.state import ServerState
from loramux.server.tenants import CallHold, Front, Principal
from loramux.server.tools import CallParser, ToolCallFormat, ToolRequest
from loramux.server.versions import DEFAULT_ALIAS

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class OpenAIFront:
    """The handlers' shared parts: state, worker pool, the base model's public name."""

    def __init__(self, state: ServerState, executor: Executor) -> None:
        self.state = state
        self.executor = executor
        self.base_name = state.settings.served_model_name or state.engine.info.base_model

    async def authenticate(self, request: Request) -> Principal:
        """The caller, looked up on a thread of --http-workers (the registry may be a
        database): so the threads the HTTP front uses are that pool's, however many
        requests arrive at once."""
        metadata = {"authorization": request.headers.get("authorization", "")}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.state.auth.authenticate, metadata)

    def model(self, model: str) -> str | None:
        """The adapter `model` names (None: the base model)."""
        return None if model == self.base_name else model

    def sampling(
        self,
        body: _GenerationBody,
        max_tokens: int,
        prompt_logprobs: int | None = None,
        constraint: ConstraintSpec | None = None,
    ) -> SamplingParams:
        """The body's decoding parameters; `constraint` replaces the body's own (a forced
        tool call's, which the body cannot make: it depends on the model's template)."""
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=body.stop_strings(),
            stop_token_ids=tuple(body.stop_token_ids),
            ignore_eos=body.ignore_eos,
            logprobs=body.top_logprobs_asked(),
            prompt_logprobs=prompt_logprobs,
            min_tokens=body.min_tokens,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=body.bias(),
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            constraint=constraint or body.constraint(),
        )

    def token_text(self, token_id: int) -> str:
        """A token's text, decoded alone (logprobs' `tokens`)."""
        return str(self.state.engine.tokenizer.decode([token_id], skip_special_tokens=False))

    def format_options(self, body: _GenerationBody) -> dict[str, Any]:
        return {
            "include_usage": body.include_usage,
            "continuous_usage": body.continuous_usage,
            "n": body.n,
            "logprobs": body.top_logprobs_asked(),
            "token_text": self.token_text,
        }

    # -- generation --

    async def generate(
        self,
        request: Request,
        body: _GenerationBody,
        answer: ResponseFormat,
        build: Callable[[GenerationCall], list[GenerationRequest]],
        renamed: dict[str, str],
    ) -> Response:
        body.refuse_unsupported(self.state.settings.max_n)
        principal = await self.authenticate(request)
        # Counted with the tenant's gRPC calls from here until its answer is sent.
        held = self.state.gate.hold(principal.tenant, Front.HTTP)
        streaming = False
        try:
            call = GenerationCall(self.state, principal, request.headers.get(ROUTE_KEY_METADATA))
            job = GenerationJob(call, lambda: build(call), renamed, self.executor)
            watcher = asyncio.create_task(_cancel_on_disconnect(request, call))
            try:
                await job.start()
                if body.stream:
                    await _stop(watcher)
                    streaming = True
                    return HeldStreamingResponse(
                        held,
                        job,
                        _sse(job, answer),
                        media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    )
                while (item := await job.next()) is not None:
                    answer.add(*item)
                return JSONResponse(answer.response())
            except BaseException as exc:
                call.cancel()
                job.close(exc)
                raise
            finally:
                await _stop(watcher)
        finally:
            if not streaming:
                held.release()

    def completion_prompts(self, body: CompletionBody) -> list[list[int]]:
        """Every prompt's token ids: texts tokenised, ids checked against the vocabulary;
        several prompts together at most --max-batch-tokens (one step's worth)."""
        engine = self.state.engine
        given = body.prompts()
        many = len(given) > 1
        prompts = []
        for i, one in enumerate(given):
            field = f"prompt[{i}]" if many else "prompt"
            if isinstance(one, str):
                prompts.append(engine.tokenize(one))
                continue
            if any(not 0 <= t < engine.info.vocab_size for t in one):
                raise InvalidArgument(
                    field, f"token id outside the vocabulary (0..{engine.info.vocab_size - 1})"
                )
            prompts.append(list(one))
        total = sum(map(len, prompts))
        limit = self.state.settings.max_batch_tokens
        if many and total > limit:
            raise InvalidArgument(
                "prompt",
                f"{len(prompts)} prompts of {total} tokens exceed --max-batch-tokens {limit}",
            )
        return prompts

    def completion_request(
        self, body: CompletionBody, request_id: str, answer: CompletionFormat
    ) -> Callable[[GenerationCall], list[GenerationRequest]]:
        """The engine requests of a completion; with `echo`, the prompts' ids and texts go
        to `answer` (and with `logprobs`, their tokens are scored)."""
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_TOKENS
        scored = body.logprobs if body.echo else None

        def prompts() -> list[list[int]]:
            ids = self.completion_prompts(body)
            if body.echo:
                tokenizer = self.state.engine.tokenizer
                answer.echo = [(p, str(tokenizer.decode(p, skip_special_tokens=True))) for p in ids]
            return ids

        return lambda call: _named_model(
            body.model,
            lambda: call.requests(
                self.model(body.model),
                prompts,
                lambda _: self.sampling(body, max_tokens, scored),
                request_id=request_id,
                n=body.n,
            ),
        )

    def chat_request(
        self, body: ChatCompletionBody, request_id: str, tools: ToolRequest | None
    ) -> Callable[[GenerationCall], list[GenerationRequest]]:
        """The engine requests of a chat: its messages (and `tools`, the body's checked
        tool fields) rendered by the template; a forced call's constraint is made for the
        call format that template teaches."""
        engine = self.state.engine

        def params(prompt: list[int]) -> SamplingParams:
            max_tokens = body.requested_max_tokens()
            if max_tokens is None:  # OpenAI: as long as the context allows
                room = engine.context_length - len(prompt)
                max_tokens = max(1, min(self.state.settings.max_new_tokens_limit, room))
            forced = None
            if tools is not None and engine.tool_format is not None:
                forced = tools.constraint(engine.tool_format)
            return self.sampling(body, max_tokens, constraint=forced)

        def prompt() -> list[int]:
            return engine.render_chat(body.chat(), tools.template_tools() if tools else None)

        return lambda call: _named_model(
            body.model,
            lambda: call.requests(
                self.model(body.model),
                lambda: [prompt()],
                params,
                request_id=request_id,
                n=body.n,
            ),
        )

    # -- models --

    def models(self, principal: Principal) -> dict[str, Any]:
        """The base model and every adapter the caller may use, with its residency."""
        state = self.state
        with state.tracked():
            records = state.registry.visible_adapters(principal.tenant)
            adapters = state.engine.adapters
            data: list[dict[str, Any]] = [
                {
                    "id": self.base_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "loramux",
                    "root": self.base_name,
                    "parent": None,
                    "loaded": True,
                    "state": "device",
                }
            ]
            for record in records:
                resident = (
                    adapters.state(record.engine_id) if record.engine_id in adapters else "stored"
                )
                own = record.owner == principal.tenant
                name = record.name if own else f"{record.owner}/{record.name}"
                entry = {
                    "id": name,
                    "object": "model",
                    "created": record.created_at,
                    "owned_by": record.owner,
                    "root": f"{record.owner}/{record.name}",
                    "parent": self.base_name,
                    "loaded": resident == "device",
                    "state": resident,
                    "public": record.public,
                    "version": f"v{record.version}",
                }
                data.append(entry)
                # Its other aliases: `name@alias` is a model id too (`name@v3` as well).
                for alias, split in state.registry.aliases(record.owner, record.name).items():
                    if alias != DEFAULT_ALIAS:
                        data.append({**entry, "id": f"{name}@{alias}", "version": split.describe()})
        return {"object": "list", "data": data}


class HeldStreamingResponse(StreamingResponse):
    """A stream that keeps its call counted against its tenant until it has been sent.

    A slow reader's stream is a call in flight as long as it is open, whether its tokens
    are still being generated or wait for the reader; released however the response ends
    (sent, client gone, server stopping), since this wraps the whole of its sending. Then
    the generation ends too: starlette leaves a body it stopped sending (client gone)
    unclosed, so it is closed here, its engine rows cancelled and the call counted.
    """

    def __init__(self, held: CallHold, job: GenerationJob, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held = held
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                body = self.body_iterator
                if isinstance(body, AsyncGenerator):
                    await body.aclose()
            finally:
                self.job.call.cancel()
                self.job.close(Cancelled(None, "the client went away"))
                self.held.release()


def _tool_parser(
    tools: ToolRequest | None, fmt: ToolCallFormat | None
) -> Callable[[], CallParser] | None:
    """Makes each choice's call parser, when the reply is searched for calls (tools asked,
    `tool_choice` not none, a template that renders them)."""
    if tools is None or not tools.calls_parsed or fmt is None:
        return None
    names, limit = tools.names(), None if tools.parallel else 1
    return lambda: CallParser(fmt, names, limit)


def _named_model(
    model: str, build: Callable[[], list[GenerationRequest]]
) -> list[GenerationRequest]:
    """`build()`, with an adapter that does not resolve reported as the unknown `model`."""
    try:
        return build()
    except NotFound as error:
        if error.field != "adapter":
            raise
        raise NotFound(
            "model", f"the model {model!r} does not exist or you have no access to it"
        ) from None


async def _cancel_on_disconnect(request: Request, call: GenerationCall) -> None:
    """Cancel `call` when the client goes away (the body was read: next comes disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            call.cancel()
            return


async def _stop(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _sse(job: GenerationJob, answer: ResponseFormat) -> AsyncIterator[bytes]:
    """Server-sent events: chunks, the usage chunk when asked for, then `[DONE]`.

    An error after the stream began is sent as an event with OpenAI's error body (the
    status line is already out); a client that goes away closes this generator, and
    leaving it cancels the engine request.
    """
    try:
        for chunk in answer.first_chunks():
            yield _event(chunk)
        while (item := await job.next()) is not None:
            for chunk in answer.chunks(*item):
                yield _event(chunk)
        if answer.include_usage:
            yield _event(answer.usage_chunk())
    except LoramuxError as error:
        yield _event(error_body(error))
    finally:
        job.call.cancel()
    yield b"data: [DONE]\n\n"


def create_app(state: ServerState, executor: Executor) -> FastAPI:
    front = OpenAIFront(state, executor)
    app = FastAPI(
        title="LoRAMux OpenAI-compatible API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(LoramuxError)
    async def on_loramux_error(_: Request, error: LoramuxError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation(exc))

    @app.exception_handler(HTTPException)
    async def on_http_exception(_: Request, exc: HTTPException) -> JSONResponse:
        return from_http_exception(exc)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        request_id = f"cmpl-{uuid.uuid4().hex}"
        answer = CompletionFormat(request_id, body.model, **front.format_options(body))
        return await front.generate(
            request,
            body,
            answer,
            front.completion_request(body, request_id, answer),
            {"max_new_tokens": "max_tokens", "prompt_logprobs": "logprobs"},
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        tools = body.tool_request()
        call_format = state.engine.tool_format
        answer = ChatFormat(
            request_id,
            body.model,
            **front.format_options(body),
            tool_parser=_tool_parser(tools, call_format),
        )
        tokens_field = (
            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        )
        return await front.generate(
            request,
            body,
            answer,
            front.chat_request(body, request_id, tools),
            {"max_new_tokens": tokens_field, "prompt": "messages", "logprobs": "top_logprobs"},
        )

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        principal = await front.authenticate(request)
        loop = asyncio.get_running_loop()
        return JSONResponse(await loop.run_in_executor(front.executor, front.models, principal))

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the process answers."""
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: serving and not draining (a load balancer stops sending on 503)."""
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app
