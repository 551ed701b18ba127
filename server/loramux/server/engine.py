"""The engine: continuous batching of many adapters' requests over one base model.

One background thread runs the loop. Every step it

1. carries out adapter warm/evict requests (device slots change only here, between passes);
2. retires cancelled and timed-out requests;
3. admits waiting requests whose adapter is resident (a cold adapter loads in the
   background meanwhile, so the running batch never waits for disk) and prefills them;
4. decodes one token for every request already running;
5. streams each new token to its request's consumer and retires finished requests.

Callers (the gRPC service, benchmarks, tests) only `submit` and read the returned stream.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from loramux.core.config import Settings
from loramux.core.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LoramuxError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer, resolve_base_model
from loramux.core.prompts import PromptEncoder
from loramux.server.adapter_store import AdapterStore
from loramux.server.adapters import LinearShape
from loramux.server.detokenize import IncrementalText
from loramux.server.lora import (
    LoraContext,
    base_linear_shapes,
    lora_groups,
    make_context,
    wrap_linear_layers,
)
from loramux.server.requests import FinishReason, GenerationRequest, TokenEvent
from loramux.server.runner import DecodeBatch, ModelRunner, PrefillBatch
from loramux.server.sampling import RowSampler, sample_next_tokens
from loramux.server.threads import compute_thread_count, in_own_thread, use_compute_threads

log = logging.getLogger(__name__)
R = TypeVar("R")

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ModelInfo:
    base_model: str
    base_model_reference: str
    quantization: str
    device: str
    context_length: int
    max_rank: int
    max_new_tokens_limit: int
    max_batch_size: int
    max_loaded_adapters: int
    vocab_size: int
    base_memory_bytes: int


@dataclass(frozen=True)
class EngineStats:
    queued: int
    running: int
    steps: int
    prompt_tokens_total: int
    generated_tokens_total: int
    adapter_bytes: int
    base_memory_bytes: int
    kv_cache_bytes: int


class RequestStream:
    """The consumer's end of one request: iterate for TokenEvents, or cancel."""

    def __init__(self, request_id: str, prompt_tokens: int, wake: Any) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._ready = threading.Condition()
        self._wake = wake
        self.cancelled = False

    def _put(self, event: TokenEvent) -> None:
        with self._ready:
            self._events.append(event)
            self._ready.notify_all()

    def cancel(self) -> None:
        """The request leaves the batch at the next engine step."""
        self.cancelled = True
        self._wake()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._ready:
                while not self._events:
                    self._ready.wait()
                event = self._events.popleft()
            yield event
            if event.finished:
                return


@dataclass
class _Active:
    """A request inside the engine (engine thread only)."""

    request: GenerationRequest
    stream: RequestStream
    sampler: RowSampler
    text: IncrementalText
    slot: int = 0  # adapter device slot, 0 = base only
    cached: int = 0  # tokens in this row's KV cache
    last_token: int = -1
    generated: int = 0
    acquire_attempts: int = 0
    done: bool = field(default=False)


class Engine:
    def __init__(
        self,
        model: Any,  # a transformers causal LM (PreTrainedModel)
        tokenizer: PreTrainedTokenizerBase,
        settings: Settings,
        resolved: ResolvedModel | None = None,
        *,
        enable_lora: bool = True,
        lora_kernel: str | None = None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer)  # the trainer tokenises with the same rules
        self.model = model
        device = next(model.parameters()).device
        base_linears: dict[str, LinearShape] = base_linear_shapes(model)
        module_names = [name for name, _ in model.named_modules()]  # before wrapping
        self._lora: LoraContext | None = None
        layers = {}
        if enable_lora:
            # The backend for this platform and the slot format, chosen once here.
            self._lora = make_context(
                device,
                settings.max_loaded_adapters + 1,
                settings.lora_slot_dtype,
                lora_kernel or settings.lora_kernel,
            )
            layers = wrap_linear_layers(model, self._lora, device)
        self._cv = threading.Condition()
        self.adapters = AdapterStore(
            layers,
            base_linears,
            max_loaded=settings.max_loaded_adapters,
            max_cpu=settings.max_cpu_adapters,
            max_rank=settings.max_rank,
            wake_engine=self._wake,
            table=self._lora.table if self._lora is not None else None,
            module_names=module_names,
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.runner = ModelRunner(model, self._lora, settings.max_batch_size, pad)
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 2048))
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        base_bytes = (
            int(model.get_memory_footprint()) if hasattr(model, "get_memory_footprint") else 0
        )
        self.info = ModelInfo(
            base_model=resolved.name if resolved else str(getattr(config, "_name_or_path", "")),
            base_model_reference=resolved.reference if resolved else "",
            quantization=settings.quantization,
            device=str(device),
            context_length=self.context_length,
            max_rank=settings.max_rank,
            max_new_tokens_limit=settings.max_new_tokens_limit,
            max_batch_size=settings.max_batch_size,
            max_loaded_adapters=settings.max_loaded_adapters,
            vocab_size=int(config.vocab_size),
            base_memory_bytes=base_bytes,
        )
        self._waiting: collections.deque[_Active] = collections.deque()
        self._running: list[_Active] = []
        self._admitting: list[_Active] = []  # taken off the queue this step, not yet running
        self._ids = itertools.count()
        self._stopping = False
        self._woken = False
        self._tasks: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._compute_threads = compute_thread_count(settings.compute_threads)
        self._steps = 0
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, settings: Settings) -> Engine:
        """Resolve and load the base model in 4-bit, wrap its layers, start the loop."""
        resolved = resolve_base_model(
            settings.base_model, settings.models_dir, settings.base_model_revision
        )
        # Loaded on a thread of its own: see loramux.server.threads.
        model = in_own_thread(
            lambda: load_base_model(resolved, settings.quantization, settings.device),
            "load-base-model",
        )
        engine = cls(model, load_tokenizer(resolved), settings, resolved)
        engine.warm_up()
        return engine

    @staticmethod
    def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
        ids: set[int] = set()
        generation = getattr(model, "generation_config", None)
        configured = getattr(generation, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(i) for i in configured)
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        return frozenset(ids)

    def run_on_engine_thread(self, work: Callable[[], R]) -> R:
        """Run `work` on the engine thread between steps, and return its result.

        For work that must see the engine's torch thread settings or own its tensors while
        no pass runs: kernel compilation (the thread count is baked into compiled CPU
        kernels), profiling and benchmarks that drive the runner directly.
        """
        if threading.current_thread() is self._thread:
            return work()
        future: Future[R] = Future()
        with self._cv:
            if self._stopping:
                raise Unavailable(None, "the engine is shutting down")
            self._tasks.append((work, future))
            self._cv.notify()
        return future.result()

    def warm_up(self) -> None:
        """Compile the LoRA kernels now, so the first adapter request is not the slow one."""
        if self._lora is None:
            return
        self.run_on_engine_thread(self._compile_kernels)

    def _compile_kernels(self) -> None:
        assert self._lora is not None
        started = time.monotonic()
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for group in lora_groups(self.adapters._layers):
            key = (group.in_features, tuple(group.outs))
            if key not in seen:
                seen.add(key)
                self._lora.backend.warm(group)
        log.info("LoRA kernels ready in %.1fs", time.monotonic() - started)

    # ---- caller side ----
    def tokenize(self, text: str) -> list[int]:
        return self.prompts.text(text)

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if not messages:
            raise InvalidArgument("messages", "at least one message is required")
        for i, (role, content) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
                )
            if not isinstance(content, str):
                raise InvalidArgument(f"messages[{i}].content", "must be text")
        return self.prompts.chat(messages, add_generation_prompt=True)

    def submit(self, request: GenerationRequest) -> RequestStream:
        params = request.params
        params.validate(self.settings.max_new_tokens_limit)
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidArgument("prompt", "is empty")
        if len(prompt) + params.max_new_tokens > self.context_length:
            raise InvalidArgument(
                "prompt",
                f"{len(prompt)} prompt tokens + max_new_tokens {params.max_new_tokens} exceed the "
                f"context window of {self.context_length}",
            )
        if any(not 0 <= t < self.info.vocab_size for t in prompt):
            raise InvalidArgument("prompt", "token id outside the vocabulary")
        if request.adapter_id is not None and request.adapter_id not in self.adapters:
            raise NotFound("adapter", f"no adapter {request.adapter_id!r}")
        stream = RequestStream(
            request.request_id or f"req-{next(self._ids)}", len(prompt), self._wake
        )
        active = _Active(
            request=request,
            stream=stream,
            sampler=RowSampler(params, prompt),
            text=IncrementalText(self.tokenizer, params.stop),
        )
        with self._cv:
            if self._stopping:
                raise Unavailable(None, "the engine is shutting down")
            if len(self._waiting) >= self.settings.max_queued_requests:
                raise ResourceExhausted("queue", "the engine's request queue is full")
            self._waiting.append(active)
            self._woken = True
            self._cv.notify()
        return stream

    def stats(self) -> EngineStats:
        with self._cv:
            queued, running = len(self._waiting), len(self._running)
        memory = self.adapters.memory()
        return EngineStats(
            queued=queued,
            running=running,
            steps=self._steps,
            prompt_tokens_total=self._prompt_tokens,
            generated_tokens_total=self._generated_tokens,
            adapter_bytes=memory["cpu_bytes"] + memory["device_slot_bytes"],
            base_memory_bytes=self.info.base_memory_bytes,
            kv_cache_bytes=self.runner.cache.nbytes,
        )

    def adapter_demand(self) -> tuple[list[str], list[str]]:
        """Adapter ids of the running requests and of the queued ones (None: base only)."""
        with self._cv:
            running = [a.request.adapter_id for a in self._running]
            waiting = [a.request.adapter_id for a in self._waiting]
        return [a for a in running if a], [a for a in waiting if a]

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still queued or running end CANCELLED."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        self.adapters.close()

    # ---- engine thread ----
    def _wake(self) -> None:
        with self._cv:
            self._woken = True
            self._cv.notify()

    def _loop(self) -> None:
        use_compute_threads(self._compute_threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._running or self._woken or self._tasks):
                        self._cv.wait(self._idle_timeout())
                        if self._deadline_passed():
                            break
                    if self._stopping:
                        break
                    self._woken = False
                    newcomers = list(self._waiting)
                    tasks = list(self._tasks)
                    self._tasks.clear()
                for work, future in tasks:
                    try:
                        future.set_result(work())
                    except BaseException as exc:  # handed to the caller waiting on it
                        future.set_exception(exc)
                try:
                    self._step(newcomers)
                except Exception as exc:  # keep serving: fail what was in flight, reset the batch
                    log.exception("engine step failed")
                    self._fail_step(step_error("step", exc))
        with self._cv:
            tasks = list(self._tasks)
            self._tasks.clear()
        for _, future in tasks:
            future.set_exception(Unavailable(None, "the engine is shutting down"))
        for active in [*self._running, *self._waiting]:
            self._finish(active, FinishReason.CANCELLED)
        self._running.clear()
        self._waiting.clear()

    def _idle_timeout(self) -> float | None:
        deadlines = [a.request.deadline for a in self._waiting if a.request.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _deadline_passed(self) -> bool:
        now = time.monotonic()
        return any(
            a.request.deadline is not None and a.request.deadline <= now for a in self._waiting
        )

    def _step(self, waiting: list[_Active]) -> None:
        self.adapters.service()
        now = time.monotonic()
        for active in self._running:
            self._check_abandoned(active, now)
        self._retire()

        admitted = self._admit(waiting, now)
        decoding = list(self._running)
        if admitted:
            self._prefill(admitted)
        if decoding:  # rows [0, len(decoding)): all still running (retired above)
            logits = self.runner.decode(
                DecodeBatch(
                    tokens=[a.last_token for a in decoding],
                    positions=[a.cached for a in decoding],
                    slots=[a.slot for a in decoding],
                )
            )
            for active in decoding:
                active.cached += 1
            self._advance(decoding, logits)
        self._steps += 1
        self._retire()
        if not self._running:
            with self._cv:
                if not self._waiting:
                    self.runner.cache.release()

    def _prefill(self, admitted: list[_Active]) -> None:
        """Prefill newcomers into the rows after the running ones, and sample their first token.

        A failure here (out of memory, a bad adapter tensor) touched only these rows: they
        end with an error and give their adapter slots back; the running rows go on.
        """
        try:
            logits = self.runner.prefill(
                PrefillBatch(
                    row_start=len(self._running),
                    prompts=[a.request.prompt_token_ids for a in admitted],
                    slots=[a.slot for a in admitted],
                )
            )
        except Exception as exc:
            log.exception("prefill of %d requests failed", len(admitted))
            error = step_error("prefill", exc)
            for active in admitted:
                self._finish(active, FinishReason.ERROR, error=error)
                self._release_slot(active)
            self._admitting = []
            return
        for active in admitted:
            active.cached = len(active.request.prompt_token_ids)
            self._prompt_tokens += active.cached
        self._running.extend(admitted)
        self._admitting = []
        self._advance(admitted, logits)

    def _check_abandoned(self, active: _Active, now: float) -> bool:
        if active.done:
            return True
        if active.stream.cancelled:
            self._finish(active, FinishReason.CANCELLED)
        elif active.request.deadline is not None and now >= active.request.deadline:
            self._finish(active, FinishReason.DEADLINE)
        return active.done

    def _admit(self, waiting: list[_Active], now: float) -> list[_Active]:
        """Pick waiting requests for this step: adapters resident, rows and tokens to spare."""
        admitted: list[_Active] = []
        self._admitting = admitted  # off the queue, not yet running: failed with the step
        rows_free = self.settings.max_batch_size - len(self._running)
        token_budget = self.settings.max_batch_tokens - len(self._running)
        widest = 0
        for active in waiting:
            if self._check_abandoned(active, now):
                self._dequeue(active)
                continue
            if len(admitted) >= rows_free:
                break
            prompt_len = len(active.request.prompt_token_ids)
            if admitted and max(widest, prompt_len) * (len(admitted) + 1) > token_budget:
                break
            adapter_id = active.request.adapter_id
            if adapter_id is not None:
                try:
                    slot = self.adapters.acquire(adapter_id, active.acquire_attempts == 0)
                except Exception as exc:  # this request only; the others go ahead
                    if not isinstance(exc, LoramuxError):
                        log.exception("adapter %s could not be acquired", adapter_id)
                    self._finish(active, FinishReason.ERROR, error=step_error("adapter load", exc))
                    self._dequeue(active)
                    continue
                active.acquire_attempts += 1
                if slot is None:
                    continue  # loading in the background; stays queued, others go ahead
                active.slot = slot
            widest = max(widest, prompt_len)
            admitted.append(active)
            self._dequeue(active)
        return admitted

    def _dequeue(self, active: _Active) -> None:
        with self._cv, contextlib.suppress(ValueError):
            self._waiting.remove(active)

    def _advance(self, rows: list[_Active], logits: torch.Tensor) -> None:
        tokens = sample_next_tokens(logits, [a.sampler for a in rows])
        for active, token in zip(rows, tokens, strict=True):
            active.generated += 1
            active.last_token = token
            self._generated_tokens += 1
            params = active.request.params
            if token in self.eos_token_ids and not params.ignore_eos:
                self._finish(active, FinishReason.EOS, token)
                continue
            if token in params.stop_token_ids:
                self._finish(active, FinishReason.STOP, token)
                continue
            delta, stopped = active.text.add(token)
            if stopped:
                self._finish(active, FinishReason.STOP, token, delta)
            elif active.generated >= params.max_new_tokens:
                self._finish(active, FinishReason.LENGTH, token, delta)
            else:
                active.stream._put(TokenEvent(token_ids=(token,), text=delta))

    def _finish(
        self,
        active: _Active,
        reason: FinishReason,
        token: int | None = None,
        delta: str = "",
        error: LoramuxError | None = None,
    ) -> None:
        if active.done:
            return
        active.done = True
        if error is None and reason is FinishReason.DEADLINE:
            error = DeadlineExceeded(None, "deadline passed inside the engine")
        active.stream._put(
            TokenEvent(
                token_ids=(token,) if token is not None else (),
                text=delta + active.text.flush(),
                finish_reason=reason,
                prompt_tokens=len(active.request.prompt_token_ids),
                completion_tokens=active.generated,
                error=error,
            )
        )

    def _retire(self) -> None:
        """Drop finished rows; move the last row into each hole to keep rows contiguous."""
        index = len(self._running) - 1
        while index >= 0:
            active = self._running[index]
            if active.done:
                last = len(self._running) - 1
                if index != last:
                    moved = self._running[last]
                    self.runner.cache.move_row(last, index, moved.cached)
                    self._running[index] = moved
                self._running.pop()
                self._release_slot(active)
            index -= 1

    def _release_slot(self, active: _Active) -> None:
        """Give a finished request's adapter slot back (once)."""
        if active.request.adapter_id is not None and active.slot:
            active.slot = 0
            self.adapters.release(active.request.adapter_id)
            with self._cv:
                self._woken = True  # a slot may have freed up for a waiting request

    def _fail_step(self, error: LoramuxError) -> None:
        """After a failed step: fail the rows it touched (all running, and any newcomers)."""
        for active in [*self._running, *self._admitting]:
            self._finish(active, FinishReason.ERROR, error=error)
        for active in self._admitting:
            self._release_slot(active)
        self._admitting = []
        self._retire()
        self.runner.cache.release()


def step_error(stage: str, exc: Exception) -> LoramuxError:
    """The status a request failed by an engine step gets: out of memory is exhausted
    resources (retry later, or with a shorter prompt), anything else a server error."""
    if isinstance(exc, LoramuxError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return ResourceExhausted(None, f"out of memory during {stage}; retry later")
    return Internal(None, f"engine {stage} failed ({type(exc).__name__}: {exc})")
