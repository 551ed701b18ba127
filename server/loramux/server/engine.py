"""The engine: continuous batching of many adapters' requests over one base model.

One background thread runs the loop. Every step it

1. carries out adapter warm/evict requests (device slots change only here, between passes);
2. retires cancelled and timed-out requests;
3. admits waiting requests whose adapter is resident (a cold adapter loads in the
   background meanwhile, so the running batch never waits for disk) and whose KV blocks
   fit in the pool, reusing cached blocks of an equal prefix;
4. gives every decoding row a block for its next token, preempting the newest requests
   (recomputed later, no token lost) when the pool runs dry;
5. prefills the next chunk of the prompts not yet cached (--max-batch-tokens per step,
   minus one per decoding row; while rows decode, at most
   --max-prefill-tokens-while-decoding of a prompt longer than that, shorter ones whole)
   and decodes one token for every decoding row, both in one pass over the weights when
   there are both (runner.py, `ModelRunner.mixed`);
6. streams each new token to its request's consumer and retires finished requests.

Callers (the gRPC service, benchmarks, tests) only `submit` and read the returned stream.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from loramux.core.config import (
    CPU_PREFILL_ATTENTION_WHILE_DECODING,
    CPU_PREFILL_TOKENS_WHILE_DECODING,
    Settings,
)
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
from loramux.core.prompts import ChatMessage, PromptEncoder
from loramux.server.adapter_store import AdapterStore
from loramux.server.adapters import LinearShape
from loramux.server.constraints.compiler import GrammarCache
from loramux.server.constraints.masks import MaskFiller
from loramux.server.cuda_graphs import check_setting as check_cuda_graphs
from loramux.server.detokenize import IncrementalText
from loramux.server.device_memory import (
    activation_bytes,
    adapter_slot_bytes,
    cuda_kv_budget,
    token_rows_bytes,
)
from loramux.server.host_memory import adapters_fitting, host_adapter_bytes, make_host_tier
from loramux.server.kv_blocks import ROOT_DIGEST, BlockPool, block_digest
from loramux.server.kv_cache import PagedKVCache
from loramux.server.logprobs import score
from loramux.server.lora import (
    LoraContext,
    base_linear_shapes,
    lora_groups,
    make_context,
    wrap_linear_layers,
)
from loramux.server.lora.experts import base_expert_shapes, wrap_experts
from loramux.server.lora.tokens import TokenTable, embedding_shape
from loramux.server.model_support import check_quantized, probe_model
from loramux.server.nf4 import use_nf4_kernel
from loramux.server.paged_attention import choose_kernel
from loramux.server.requests import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from loramux.server.runner import DecodeBatch, ModelRunner, PrefillBatch
from loramux.server.sampling import RowSampler, sample_next_tokens
from loramux.server.slot_copies import make_slot_copies
from loramux.server.streams import RequestStream
from loramux.server.threads import compute_thread_count, in_own_thread, use_compute_threads
from loramux.server.tools import ToolCallFormat, template_format

if TYPE_CHECKING:
    from loramux.server.adapters import ExpertShape
    from loramux.server.lora.experts import MultiLoraExperts

log = logging.getLogger(__name__)
R = TypeVar("R")

CHAT_ROLES = ("system", "user", "assistant")
CPU_KV_BYTES = 1 << 30  # default KV pool on the CPU; resident from start (zeroed)


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
    kv_cache_bytes: int  # the KV block pool, reserved at start
    kv_block_size: int  # token positions per block
    kv_blocks_total: int


@dataclass(frozen=True)
class EngineStats:
    queued: int
    running: int
    steps: int
    prompt_tokens_total: int
    generated_tokens_total: int
    adapter_bytes: int
    base_memory_bytes: int
    kv_cache_bytes: int  # the pool's size (fixed)
    kv_blocks_total: int
    kv_blocks_used: int  # held by running requests (cached blocks nobody holds are free)
    preemptions: int  # requests taken out of the batch to free blocks, and recomputed later
    prefix_hit_tokens: int  # prompt tokens whose KV came from the prefix cache
    prefill_tokens_total: int  # prompt (and recomputed) tokens run through the model


@dataclass(eq=False)  # identity: `a in self._running` must not compare every field
class _Active:
    """A request inside the engine (engine thread only)."""

    request: GenerationRequest
    stream: RequestStream
    sampler: RowSampler
    text: IncrementalText
    seq: int  # arrival order: the newest are preempted first
    tokens: list[int]  # prompt + generated; all but the last are in the KV cache when decoding
    slot: int = 0  # adapter device slot, 0 = base only
    holds_slot: bool = False
    cached: int = 0  # tokens whose keys/values are in this request's blocks
    blocks: list[int] = field(default_factory=list)  # block table: position p in blocks[p // B]
    kv_identity: bytes = b""  # what besides its tokens determines its KV (set at admission)
    digests: list[bytes] = field(default_factory=list)  # of its full blocks, in order
    registered: int = 0  # full blocks offered to the prefix cache
    generated: int = 0
    acquire_attempts: int = 0
    admitted_once: bool = False
    done: bool = field(default=False)
    final: TokenEvent | None = None  # its last event, held until its resources are back
    # prompt_logprobs asked: the prompt tokens' so far, by position (the first is None)
    prompt_scores: list[TokenLogprob | None] = field(default_factory=list)
    scores_sent: bool = False  # handed out with its first event

    @property
    def pending(self) -> int:
        """Tokens still to run through the model (1 when decoding, more while prefilling)."""
        return len(self.tokens) - self.cached

    @property
    def scoring(self) -> bool:
        """Its prompt's tokens still need their logprobs (so every position must be run:
        no prefix-cache hit, as the cached positions' logits are gone)."""
        prompt = len(self.request.prompt_token_ids)
        return self.request.params.prompt_logprobs is not None and len(self.prompt_scores) < prompt

    def take_prompt_scores(self) -> tuple[TokenLogprob | None, ...]:
        """The prompt's logprobs once, for its first event (empty when not asked)."""
        if self.scores_sent or self.request.params.prompt_logprobs is None:
            return ()
        self.scores_sent = True
        return tuple(self.prompt_scores)


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
        # the call format the chat template teaches; None: it cannot render tools
        self.tool_format: ToolCallFormat | None = template_format(tokenizer.chat_template)
        self.model = model
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # What the engine relies on in this model, or a start-up refusal naming what it lacks.
        shape = probe_model(model, pad)
        check_quantized(model, base_linear_shapes(model))
        check_cuda_graphs(settings.cuda_graphs, device)  # refused, saying why
        # The 4-bit layers' matmul, chosen once here (after the checks, which look at
        # bitsandbytes' own layers), before the LoRA wrappers take them.
        self.native_nf4 = use_nf4_kernel(model, settings.nf4_kernel, device)
        base_linears: dict[str, LinearShape] = base_linear_shapes(model)
        module_names = [name for name, _ in model.named_modules()]  # before wrapping
        # the fused MoE experts parameters `target_parameters` may name (lora/experts.py)
        base_experts = base_expert_shapes(model)
        self._lora: LoraContext | None = None
        layers = {}
        experts: dict[str, MultiLoraExperts] = {}
        tokens: TokenTable | None = None
        if enable_lora:
            # The backend for this platform and the slot format, chosen once here.
            self._lora = make_context(
                device,
                settings.max_loaded_adapters + 1,
                settings.lora_slot_dtype,
                lora_kernel or settings.lora_kernel,
            )
            layers = wrap_linear_layers(model, self._lora, device)
            experts = wrap_experts(model, self._lora, device)
            tokens = TokenTable(model, device)
        self._cv = threading.Condition()
        # The CPU tier's memory and the slot install path for this device, chosen once:
        # plain memory and synchronous copies on the CPU; pinned memory within
        # --pinned-host-bytes and a side stream on CUDA (host_memory.py, slot_copies.py).
        host = make_host_tier(device, settings.pinned_host_bytes)
        if host.budget is not None:
            per_adapter = host_adapter_bytes(
                base_linears.values(), settings.max_rank, base_experts.values()
            )
            log.info(
                "CPU tier: %s host memory up to %d bytes: %d adapters of rank %d fit "
                "(--max-cpu-adapters %d)",
                host.memory.name,
                host.budget,
                adapters_fitting(host.budget, per_adapter, settings.max_cpu_adapters),
                settings.max_rank,
                settings.max_cpu_adapters,
            )
        self.adapters = AdapterStore(
            layers,
            base_linears,
            max_loaded=settings.max_loaded_adapters,
            max_cpu=settings.max_cpu_adapters,
            max_rank=settings.max_rank,
            wake_engine=self._wake,
            table=self._lora.table if self._lora is not None else None,
            module_names=module_names,
            experts=experts,
            base_experts=base_experts if enable_lora else {},
            tokens=tokens,
            embedding=embedding_shape(model, settings.max_trainable_tokens),
            host=host,
            copies=make_slot_copies(device),
        )
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 2048))
        geometry = shape.geometry
        num_blocks = self._pool_blocks(settings, geometry, device, base_linears, base_experts)
        self.prefill_tokens_while_decoding = self._prefill_budget(settings, device)
        # query-key pairs a chunk beside decoding rows may attend to (None: no limit)
        self.prefill_attention_while_decoding = self._attention_budget(settings, device)
        attention_kernel = choose_kernel(
            settings.attention_kernel,
            device,
            config,
            head_dim=geometry["head_dim"],
            kv_heads=geometry["kv_heads"],
            block_size=settings.kv_block_size,
            variants=shape.attention_variants,
        )
        self.runner = ModelRunner(
            model,
            self._lora,
            pad,
            num_blocks,
            settings.kv_block_size,
            shape,
            attention_kernel,
            tokens=tokens,
        )
        self.blocks = BlockPool(
            num_blocks, settings.kv_block_size, prefix_caching=settings.prefix_caching
        )
        log.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB (%d tokens); attention: %s",
            num_blocks,
            settings.kv_block_size,
            self.runner.cache.nbytes / 2**20,
            num_blocks * settings.kv_block_size,
            f"{attention_kernel.name} paged kernel"
            if attention_kernel is not None
            else "torch SDPA over gathers",
        )
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
            kv_cache_bytes=self.runner.cache.nbytes,
            kv_block_size=settings.kv_block_size,
            kv_blocks_total=num_blocks,
        )
        # Structured outputs: grammars compiled for this tokenizer, in a pool of their own.
        self.grammars = GrammarCache(
            tokenizer,
            self.info.vocab_size,
            sorted(self.eos_token_ids),
            capacity=settings.grammar_cache_size,
            timeout=settings.grammar_compile_seconds,
            threads=settings.grammar_compile_threads,
            memory_bytes=settings.grammar_compile_memory_bytes,
        )
        # ... and the constrained rows' token masks, filled while the forward pass runs
        self.masks = MaskFiller(overlap=settings.grammar_mask_overlap)
        self._waiting: collections.deque[_Active] = collections.deque()
        self._running: list[_Active] = []
        self._ids = itertools.count()
        self._stopping = False
        self._woken = False
        self._tasks: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._compute_threads = compute_thread_count(settings.compute_threads)
        self._steps = 0
        self._prompt_tokens = 0
        self._prefill_tokens = 0
        self._prefix_hit_tokens = 0
        self._preemptions = 0
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

    def _pool_blocks(
        self,
        settings: Settings,
        geometry: dict[str, int],
        device: torch.device,
        shapes: dict[str, LinearShape],
        experts: dict[str, ExpertShape],
    ) -> int:
        """How many KV blocks --kv-cache-bytes buys (auto: see the setting's help; on CUDA
        `device_memory.cuda_kv_budget`)."""
        per_block = PagedKVCache.bytes_per_block(
            block_size=settings.kv_block_size, dtype=torch.bfloat16, **geometry
        )
        budget = settings.kv_cache_bytes
        if budget == 0 and device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            config = self.model.config
            plan = cuda_kv_budget(
                free,
                total,
                settings.gpu_memory_fraction,
                adapter_slot_bytes(
                    shapes.values(),
                    settings.max_rank,
                    settings.max_loaded_adapters,
                    element_size=1 if settings.lora_slot_dtype == "int8" else 2,
                    experts=experts.values(),
                )
                + token_rows_bytes(
                    config.hidden_size,
                    settings.max_trainable_tokens,
                    settings.max_loaded_adapters,
                ),
                activation_bytes(
                    settings.max_batch_tokens,
                    settings.max_batch_size,
                    config.hidden_size,
                    getattr(config, "intermediate_size", 4 * config.hidden_size),
                    config.vocab_size,
                ),
            )
            log.info("CUDA memory: %s", plan)
            budget = plan.kv
        elif budget == 0:
            context_blocks = -(-self.context_length // settings.kv_block_size)
            budget = min(CPU_KV_BYTES, settings.max_batch_size * context_blocks * per_block)
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(
                f"--kv-cache-bytes {budget} is less than one KV block ({per_block} bytes)"
            )
        return int(blocks)

    @staticmethod
    def _prefill_budget(settings: Settings, device: torch.device) -> int:
        """--max-prefill-tokens-while-decoding, auto resolved for the device.

        On the CPU a prefill pass costs about a decode step before its first token (every
        NF4 weight is dequantised and read once per pass) plus its tokens' work, which
        grows with the context they attend to, so a chunk next to decoding rows is kept
        small (docs/performance.md, issue 12). On CUDA the one --max-batch-tokens budget
        applies, as in vLLM (decode first, prefill fills the rest); not measured here.
        """
        if settings.max_prefill_tokens_while_decoding:
            return min(settings.max_prefill_tokens_while_decoding, settings.max_batch_tokens)
        if device.type == "cpu":
            return min(CPU_PREFILL_TOKENS_WHILE_DECODING, settings.max_batch_tokens)
        return settings.max_batch_tokens

    @staticmethod
    def _attention_budget(settings: Settings, device: torch.device) -> int | None:
        """--max-prefill-attention-while-decoding, auto resolved for the device (None: no
        limit). On the CPU late chunks of a long prompt cost mostly attention (each token
        attends to the whole prompt so far), so the limit keeps a step that carries one
        within a few decode steps (docs/performance.md, issue 12). On CUDA attention is
        cheap next to reading the weights: no limit (not measured here)."""
        if settings.max_prefill_attention_while_decoding:
            return settings.max_prefill_attention_while_decoding
        return CPU_PREFILL_ATTENTION_WHILE_DECODING if device.type == "cpu" else None

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
        log.info(
            "LoRA backend %s (%s kernel) ready in %.1fs",
            self._lora.backend.name,
            self._lora.backend.kernel_mode,
            time.monotonic() - started,
        )

    # ---- caller side ----
    def tokenize(self, text: str) -> list[int]:
        return self.prompts.text(text)

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """A chat's prompt ids, rendered by the model's template; `tools` and tool messages
        (role `tool`, an assistant's `tool_calls`) only where that template renders them
        (`tool_format`), else refused naming the field: a template that ignores them would
        silently drop what the model must see."""
        if not messages:
            raise InvalidArgument("messages", "at least one message is required")
        no_tools = "the model's chat template does not render tools"
        if tools and self.tool_format is None:
            raise InvalidArgument("tools", no_tools)
        for i, message in enumerate(messages):
            if isinstance(message, Mapping):
                role, content = message.get("role"), message.get("content")
                if message.get("tool_calls") and self.tool_format is None:
                    raise InvalidArgument(f"messages[{i}].tool_calls", no_tools)
            else:
                role, content = message
            roles = CHAT_ROLES if self.tool_format is None else (*CHAT_ROLES, "tool")
            if role not in roles:
                raise InvalidArgument(
                    f"messages[{i}].role", f"must be one of {', '.join(roles)}, got {role!r}"
                )
            if not isinstance(content, str):
                raise InvalidArgument(f"messages[{i}].content", "must be text")
        return self.prompts.chat(messages, add_generation_prompt=True, tools=tools)

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
        for token, _ in params.logit_bias:
            if not 0 <= token < self.info.vocab_size:
                raise InvalidArgument("logit_bias", f"token id {token} outside the vocabulary")
        longest = len(prompt) + params.max_new_tokens
        if self.blocks.blocks_for(longest) > self.blocks.num_blocks:
            raise ResourceExhausted(
                "max_new_tokens",
                f"{len(prompt)} prompt tokens + max_new_tokens {params.max_new_tokens} need "
                f"more KV cache than the server has: {self.blocks.num_blocks} blocks of "
                f"{self.blocks.block_size} tokens (--kv-cache-bytes {self.info.kv_cache_bytes})",
            )
        if request.adapter_id is not None and request.adapter_id not in self.adapters:
            raise NotFound("adapter", f"no adapter {request.adapter_id!r}")
        grammar = request.grammar
        if params.constraint is not None and grammar is None:
            grammar = self.grammars.compile(params.constraint)  # the caller's thread
        seq = next(self._ids)
        stream = RequestStream(
            request.request_id or f"req-{seq}",
            len(prompt),
            self._wake,
            self.settings.stream_interval,
        )
        active = _Active(
            request=request,
            stream=stream,
            sampler=RowSampler(
                params,
                prompt,
                self._ending_ids(params),
                grammar.matcher() if params.constraint is not None and grammar else None,
            ),
            text=IncrementalText(
                self.tokenizer,
                params.stop,
                skip_special_tokens=params.skip_special_tokens,
                include_stop=params.include_stop_str_in_output,
            ),
            seq=seq,
            tokens=list(prompt),
            prompt_scores=[None] if params.prompt_logprobs is not None else [],
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

    def _ending_ids(self, params: SamplingParams) -> frozenset[int]:
        """The tokens that end an output (held back before min_tokens)."""
        ending = frozenset(params.stop_token_ids)
        return ending if params.ignore_eos else ending | self.eos_token_ids

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
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.used,
            preemptions=self._preemptions,
            prefix_hit_tokens=self._prefix_hit_tokens,
            prefill_tokens_total=self._prefill_tokens,
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
        self.grammars.close()
        self.masks.close()

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
        self._retire()
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
        self._admit(waiting, now)
        decoding = self._reserve_decode_blocks([a for a in self._running if a.pending == 1])
        chunks = self._prefill_chunks([a for a in self._running if a.pending > 1], len(decoding))
        sampling = decoding + [a for a, n in chunks if n == a.pending]
        self.masks.start([a.sampler.constraint for a in sampling if a.sampler.constraint])
        if chunks and decoding:
            self._mixed(decoding, chunks)
        elif chunks:
            self._prefill(chunks)
        elif decoding:
            self._decode(decoding)
        self._steps += 1
        self._retire()
        if not self._running and self.adapters.copies_pending:
            with self._cv:  # requests wait and none has arrived since this step began
                idle = bool(self._waiting) and not self._woken
            if idle:
                # They may wait for their adapter's copy into a slot (a side stream on
                # CUDA, slot_copies.py), and nothing runs: no step to keep going, and
                # nothing else would wake the loop. Wait for the copies here, then admit.
                self.adapters.wait_for_copies()
                self._wake()

    def _prefill_chunks(
        self, prefilling: list[_Active], decoding: int
    ) -> list[tuple[_Active, int]]:
        """The next chunk of each prompt for this step, oldest first, within the token budget.

        The budget is --max-batch-tokens minus one token per decoding row, and while rows
        are decoding at most --max-prefill-tokens-while-decoding tokens and, per row, at
        most --max-prefill-attention-while-decoding query-key pairs (their inter-token
        latency is the step's time). Those two caps are for prompts longer than a capped
        chunk: a prompt that fits one whole joins whole, however many have arrived, within
        --max-batch-tokens. Otherwise a burst of short prompts (gRPC calls arriving over a
        few ms while the first decodes) crept in one or two a step, every step a pass over
        all the weights and the adapters the batch names: 32 calls took 15 such passes
        (through gRPC 0.61x the base model for 32 adapters against 0.76x in one pass, the
        base model itself 13% slower; docs/performance.md, issue 13). Beside decoding rows
        the chunks run in the decode pass, flattened: each costs its own tokens; the
        oldest prompt takes what the budget allows and later ones join only whole, so that
        no prompt is cut into more chunks than it must be (each cut moves its bf16 numbers
        a little away from a one-pass prefill, the way PEFT runs it). A prefill pass of its
        own is right-padded, so it costs rows x its longest chunk: the first row sets that
        width, later rows take at most as much.
        """
        budget = self.settings.max_batch_tokens - decoding
        capped = self.prefill_tokens_while_decoding  # left for a cut chunk beside decoding rows
        chunks: list[tuple[_Active, int]] = []
        width = 0
        for active in sorted(prefilling, key=lambda a: a.seq):
            if decoding:
                attention = self._attention_cap(active, decoding)
                most = min(self.prefill_tokens_while_decoding, attention)
                if active.pending <= most:  # fits a capped chunk whole: joins whole
                    take = active.pending if active.pending <= budget else 0
                else:
                    take = min(active.pending, budget, capped, most)
                if take < 1 or (chunks and take < active.pending):
                    break
                chunks.append((active, take))
                budget -= take
                capped -= take
            elif not chunks:
                width = min(active.pending, budget)
                if width < 1:
                    break
                chunks.append((active, width))
            elif (len(chunks) + 1) * width <= budget:
                chunks.append((active, min(active.pending, width)))
            else:
                break
        return chunks

    def _attention_cap(self, active: _Active, decoding: int) -> int:
        """Most tokens of `active`'s prompt whose attention fits beside decoding rows.

        A chunk of w tokens after c cached ones attends to about w x (c + w) pairs: the
        largest w within --max-prefill-attention-while-decoding, at least 1 so that every
        prompt advances. Unlimited when nothing decodes or no limit applies (see
        `_attention_budget`).
        """
        area = self.prefill_attention_while_decoding
        if not decoding or area is None:
            return active.pending
        c = active.cached
        return max(1, (math.isqrt(c * c + 4 * area) - c) // 2)

    def _prefill(self, chunks: list[tuple[_Active, int]]) -> None:
        """Run one chunk of each prefilling row; sample for the rows whose prompt is done.

        A failure here (out of memory, a bad adapter tensor) touched only these rows: they
        end with an error and give their blocks and adapter slots back (at the step's
        retire); the decoding rows go on.
        """
        rows = [a for a, _ in chunks]
        try:
            logits = self.runner.prefill(self._prefill_batch(chunks))
        except Exception as exc:
            log.exception("prefill of %d requests failed", len(rows))
            error = step_error("prefill", exc)
            for active in rows:
                self._finish(active, FinishReason.ERROR, error=error)
            return
        self._prefilled(chunks, logits)

    def _decode(self, decoding: list[_Active]) -> None:
        """One token for every decoding row (a failure here fails the step: see _loop)."""
        self._decoded(decoding, self.runner.decode(self._decode_batch(decoding)))

    def _mixed(self, decoding: list[_Active], chunks: list[tuple[_Active, int]]) -> None:
        """Decode rows and prefill chunks in one pass over the weights.

        If that pass fails, its two halves run apart, so that a failure only a chunk
        causes (its prompt's memory, its adapter) fails only that chunk's requests, as
        with separate passes, and the decoding rows get their token.
        """
        try:
            decoded, prefilled = self.runner.mixed(
                self._decode_batch(decoding), self._prefill_batch(chunks)
            )
        except Exception:
            log.warning("mixed pass failed; running its prefill and decode apart", exc_info=True)
            self._prefill(chunks)
            self._decode([a for a in decoding if not a.done])
            return
        self._prefilled(chunks, prefilled)
        self._decoded(decoding, decoded)

    @staticmethod
    def _prefill_batch(chunks: list[tuple[_Active, int]]) -> PrefillBatch:
        return PrefillBatch(
            prompts=[a.tokens[a.cached : a.cached + n] for a, n in chunks],
            slots=[a.slot for a, _ in chunks],
            block_tables=[a.blocks for a, _ in chunks],
            starts=[a.cached for a, _ in chunks],
            scored=[a.scoring for a, _ in chunks],
        )

    @staticmethod
    def _decode_batch(decoding: list[_Active]) -> DecodeBatch:
        return DecodeBatch(
            tokens=[a.tokens[-1] for a in decoding],
            positions=[a.cached for a in decoding],
            slots=[a.slot for a in decoding],
            block_tables=[a.blocks for a in decoding],
        )

    def _prefilled(self, chunks: list[tuple[_Active, int]], logits: torch.Tensor) -> None:
        """After a pass ran these chunks: score the prompts that asked, count the chunks,
        offer full blocks, sample for the rows whose prompt is now cached (a row that
        asked for no new tokens, only its prompt's scores, ends there).

        `logits`: [chunks, vocab] after each chunk's last token, then [chunk tokens, vocab]
        of each scoring row's chunk (runner.PrefillBatch.scored)."""
        finished = []
        offset = len(chunks)
        for active, n in chunks:
            if active.scoring:
                self._score_prompt(active, logits[offset : offset + n])
                offset += n
        for index, (active, n) in enumerate(chunks):
            active.cached += n
            self._prefill_tokens += n
            self._register_full_blocks(active)
            if active.pending == 0 and active.request.params.max_new_tokens == 0:
                self._finish(active, FinishReason.LENGTH)
            elif active.pending == 0:
                finished.append(index)
        if finished:
            self._advance([chunks[i][0] for i in finished], logits[finished])

    @staticmethod
    def _score_prompt(active: _Active, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens this chunk's positions predict: logits [chunk
        tokens, vocab] at positions [cached, cached + chunk tokens) score the tokens one
        position later, those not scored yet (a preempted request runs its prompt again)."""
        prompt = active.request.prompt_token_ids
        first = len(active.prompt_scores)  # the next prompt position to score (>= 1)
        last = min(active.cached + len(logits), len(prompt) - 1)  # inclusive
        if last < first:
            return
        rows = logits[first - 1 - active.cached : last - active.cached]
        top = active.request.params.prompt_logprobs or 0
        active.prompt_scores += score(rows, prompt[first : last + 1], top)

    def _decoded(self, decoding: list[_Active], logits: torch.Tensor) -> None:
        for active in decoding:
            active.cached += 1
            self._register_full_blocks(active)
        self._advance(decoding, logits)

    def prefill_logits(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """One unchunked prefill pass over `prompts` on fresh blocks, outside any request.

        For tests and benchmarks comparing prefill logits [rows, vocab] with a reference;
        call it on the engine thread (`run_on_engine_thread`) so no step runs meanwhile.
        """
        tables = []
        try:
            for prompt in prompts:
                blocks = self.blocks.allocate(self.blocks.blocks_for(len(prompt)))
                if blocks is None:
                    raise ResourceExhausted("kv_cache_bytes", "no room in the KV cache")
                tables.append(blocks)
            return self.runner.prefill(PrefillBatch(prompts, slots, tables))
        finally:
            for table in tables:
                self.blocks.release(table)

    def _reserve_decode_blocks(self, decoding: list[_Active]) -> list[_Active]:
        """A block for each decoding row's next token; preempt the newest when none is left."""
        for active in sorted(decoding, key=lambda a: a.seq):
            while active in self._running and len(active.blocks) * self.blocks.block_size <= (
                active.cached
            ):
                block = self.blocks.allocate(1)
                if block is not None:
                    active.blocks.extend(block)
                else:
                    self._preempt(max(self._running, key=lambda a: a.seq))
        return [a for a in decoding if a in self._running]

    def _preempt(self, active: _Active) -> None:
        """Free a running request's blocks; it waits in order and recomputes its tokens later.

        Recompute rather than swap: its full blocks stay in the prefix cache while nobody
        needs them, so a resumed request often gets most of them back for free.
        """
        log.info("KV cache full: preempting %s", active.stream.request_id)
        self._running.remove(active)
        self._release_resources(active)
        active.cached, active.registered = 0, 0
        self._preemptions += 1
        with self._cv:
            self._waiting.append(active)
            self._waiting = collections.deque(sorted(self._waiting, key=lambda a: a.seq))
            self._woken = True

    def _release_resources(self, active: _Active) -> None:
        self.blocks.release(active.blocks)
        active.blocks = []
        if active.holds_slot:
            assert active.request.adapter_id is not None
            self.adapters.release(active.request.adapter_id)
            active.holds_slot, active.slot = False, 0
            with self._cv:
                self._woken = True  # a slot may have freed up for a waiting request

    def _kv_identity(self, active: _Active) -> bytes:
        """What besides the tokens keys this request's blocks: its cache scope and adapter.

        Every adapter gets its own: one that changes any layer before the last changes the
        hidden states all later layers project into keys and values, whatever modules it
        targets, so only an adapter that touches nothing but the last layer's q/o/MLP
        would leave them equal to the base model's (not worth a special case).
        """
        adapter_id = active.request.adapter_id
        adapter = b"base" if adapter_id is None else self.adapters.kv_identity(adapter_id)
        return active.request.cache_scope.encode() + b"\0" + adapter

    def _prefix_digests(self, active: _Active) -> list[bytes]:
        """Digests of the full blocks a prefix hit may cover (never the last token: its
        logits are needed), computed once per request. None while its prompt is to be
        scored: every position's logits are needed then, so it is recomputed (its blocks
        are still offered to others; docs/engine.md, Logprobs and prompt scoring)."""
        if not self.blocks.prefix_caching or active.scoring:
            return []
        size = self.blocks.block_size
        wanted = (len(active.tokens) - 1) // size
        if len(active.digests) < wanted:
            identity = active.kv_identity
            parent = active.digests[-1] if active.digests else ROOT_DIGEST
            for i in range(len(active.digests), wanted):
                parent = block_digest(parent, identity, active.tokens[i * size : (i + 1) * size])
                active.digests.append(parent)
        return active.digests[:wanted]

    def _register_full_blocks(self, active: _Active) -> None:
        full = active.cached // self.blocks.block_size
        if full <= active.registered or not self.blocks.prefix_caching:
            return
        size = self.blocks.block_size
        identity = active.kv_identity
        for i in range(active.registered, full):
            if i == len(active.digests):
                parent = active.digests[-1] if active.digests else ROOT_DIGEST
                tokens = active.tokens[i * size : (i + 1) * size]
                active.digests.append(block_digest(parent, identity, tokens))
            self.blocks.register(active.blocks[i], active.digests[i])
        active.registered = full

    def _check_abandoned(self, active: _Active, now: float) -> bool:
        if active.done:
            return True
        if active.stream.cancelled:
            self._finish(active, FinishReason.CANCELLED)
        elif active.request.deadline is not None and now >= active.request.deadline:
            self._finish(active, FinishReason.DEADLINE)
        return active.done

    def _admit(self, waiting: list[_Active], now: float) -> None:
        """Move waiting requests into the batch, in arrival order, while rows and blocks last.

        A request whose adapter is still loading is skipped (it stays queued, others go
        ahead); one whose blocks do not fit stops admission, so a long prompt is not
        overtaken forever by short ones. One whose next uncached block a running request is
        computing right now waits for it, so that 32 requests arriving together with the
        same long system prompt prefill it once, not 32 times.
        """
        rows_free = self.settings.max_batch_size - len(self._running)
        computing = {d for a in self._running for d in a.digests[a.registered :]}
        full = False  # no rows or blocks left this step: later waiters are only checked
        for active in waiting:
            # Every waiter is checked, also behind a full batch: a cancelled or expired
            # request leaves the queue (and ends its stream) now, not when rows free up.
            if self._check_abandoned(active, now):
                self._dequeue(active)
                continue
            if full or rows_free <= 0:
                full = True
                continue
            try:
                if not active.kv_identity:
                    active.kv_identity = self._kv_identity(active)
            except LoramuxError as exc:  # its adapter was deleted while it waited
                self._finish(active, FinishReason.ERROR, error=exc)
                self._dequeue(active)
                continue
            digests = self._prefix_digests(active)
            hits = self.blocks.lookup(digests)
            if len(hits) < len(digests) and digests[len(hits)] in computing:
                self.blocks.release(hits)
                continue
            needed = self.blocks.blocks_for(len(active.tokens)) - len(hits)
            if needed > self.blocks.available:
                self.blocks.release(hits)
                full = True
                continue
            adapter_id = active.request.adapter_id
            if adapter_id is not None:
                try:
                    slot = self.adapters.acquire(adapter_id, active.acquire_attempts == 0)
                except Exception as exc:  # this request only; the others go ahead
                    if not isinstance(exc, LoramuxError):
                        log.exception("adapter %s could not be acquired", adapter_id)
                    self.blocks.release(hits)
                    self._finish(active, FinishReason.ERROR, error=step_error("adapter load", exc))
                    self._dequeue(active)
                    continue
                active.acquire_attempts += 1
                if slot is None:
                    self.blocks.release(hits)
                    continue  # loading in the background; stays queued, others go ahead
                active.slot, active.holds_slot = slot, True
            fresh = self.blocks.allocate(needed)
            assert fresh is not None, "checked against available above"
            active.blocks = hits + fresh
            active.cached = active.registered = len(hits)
            active.cached *= self.blocks.block_size
            self._prefix_hit_tokens += active.cached
            if not active.admitted_once:
                active.admitted_once = True
                self._prompt_tokens += len(active.request.prompt_token_ids)
            self._running.append(active)
            computing.update(active.digests[active.registered :])
            rows_free -= 1
            self._dequeue(active)

    def _dequeue(self, active: _Active) -> None:
        with self._cv, contextlib.suppress(ValueError):
            self._waiting.remove(active)

    def _advance(self, rows: list[_Active], logits: torch.Tensor) -> None:
        """Sample each row's next token (logits [rows, vocab]), with its logprob when asked:
        from the raw logits, taken before sampling adjusts them (penalties, bias)."""
        asking = [i for i, a in enumerate(rows) if a.request.params.logprobs is not None]
        raw = logits[asking].clone() if asking else None  # [asking rows, vocab]
        tokens = sample_next_tokens(logits, [a.sampler for a in rows], self.masks)
        scored: list[TokenLogprob | None] = [None] * len(rows)
        for j, i in enumerate(asking):
            assert raw is not None
            top = rows[i].request.params.logprobs or 0
            scored[i] = score(raw[j : j + 1], [tokens[i]], top)[0]
        for active, token, logprob in zip(rows, tokens, scored, strict=True):
            constraint = active.sampler.constraint
            if constraint is not None and constraint.error is not None:
                error = Internal(None, f"the request's constraint failed: {constraint.error}")
                self._finish(active, FinishReason.ERROR, error=error)
                continue
            active.generated += 1
            active.tokens.append(token)
            self._generated_tokens += 1
            params = active.request.params
            if token in self.eos_token_ids and not params.ignore_eos:
                self._finish(active, FinishReason.EOS, token, logprob=logprob)
                continue
            if token in params.stop_token_ids:
                self._finish(active, FinishReason.STOP, token, logprob=logprob)
                continue
            delta, stopped = active.text.add(token)
            if constraint is not None and constraint.rejected:
                error = Internal(None, f"token {token} broke the request's constraint")
                self._finish(active, FinishReason.ERROR, token, delta, error, logprob)
            elif stopped or (constraint is not None and constraint.terminated):
                self._finish(active, FinishReason.STOP, token, delta, logprob=logprob)
            elif active.generated >= params.max_new_tokens:
                self._finish(active, FinishReason.LENGTH, token, delta, logprob=logprob)
            else:
                active.stream._put(
                    TokenEvent(
                        token_ids=(token,),
                        text=delta,
                        logprobs=(logprob,) if logprob is not None else (),
                        prompt_logprobs=active.take_prompt_scores(),
                    )
                )

    def _finish(
        self,
        active: _Active,
        reason: FinishReason,
        token: int | None = None,
        delta: str = "",
        error: LoramuxError | None = None,
        logprob: TokenLogprob | None = None,
    ) -> None:
        """End a request. Its last event reaches its stream once its KV blocks and adapter
        slot are back (now, or at the step's `_retire`): a client that has seen its stream
        end sees the engine's stats, and the adapter's refcount, without it."""
        if active.done:
            return
        active.done = True
        if error is None and reason is FinishReason.DEADLINE:
            error = DeadlineExceeded(None, "deadline passed inside the engine")
        active.final = TokenEvent(
            token_ids=(token,) if token is not None else (),
            text=delta + active.text.flush(),
            finish_reason=reason,
            prompt_tokens=len(active.request.prompt_token_ids),
            completion_tokens=active.generated,
            error=error,
            logprobs=(logprob,) if logprob is not None else (),
            prompt_logprobs=active.take_prompt_scores() if error is None else (),
        )
        if not active.blocks and not active.holds_slot:
            self._deliver_final(active)

    @staticmethod
    def _deliver_final(active: _Active) -> None:
        if active.final is not None:
            active.stream._put(active.final)
            active.final = None

    def _retire(self) -> None:
        """Drop finished requests, returning their blocks and adapter slots, then end
        their streams."""
        finished = [a for a in self._running if a.done]
        if finished:
            self._running = [a for a in self._running if not a.done]
            for active in finished:
                self._release_resources(active)
                self._deliver_final(active)
            if self._waiting:
                # What a waiter waited for (rows, blocks, a shared prefix being computed)
                # may be free now, and the loop sleeps when nothing runs: a request that
                # ends in the step it was admitted in (max_new_tokens 1, or prompt scoring)
                # left the others queued until some unrelated call woke the engine.
                self._wake()

    def _fail_step(self, error: LoramuxError) -> None:
        """After a failed step: fail the rows it touched (every running request, the ones
        admitted this step included), returning their blocks and slots."""
        for active in self._running:
            self._finish(active, FinishReason.ERROR, error=error)
        self._retire()


def step_error(stage: str, exc: Exception) -> LoramuxError:
    """The status a request failed by an engine step gets: out of memory is exhausted
    resources (retry later, or with a shorter prompt), anything else a server error."""
    if isinstance(exc, LoramuxError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return ResourceExhausted(None, f"out of memory during {stage}; retry later")
    return Internal(None, f"engine {stage} failed ({type(exc).__name__}: {exc})")
