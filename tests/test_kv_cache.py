"""Issue 12: the paged KV cache on the real 4-bit SmolLM2.

Every generation is compared with the same request run alone through the reference (the
NF4 base model, or PeftModel for an adapter, greedy, with transformers' own KV cache):
a request preempted and recomputed, a prompt prefilled in chunks between decode steps,
and a prompt whose leading blocks come from the prefix cache give the same tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import near_tie, peft_with_adapters, tokens_before_parting

from loramux.core.config import Settings
from loramux.core.errors import ResourceExhausted
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.engine import Engine, RequestStream
from loramux.server.kv_blocks import BlockPool
from loramux.server.kv_cache import PagedKVCache
from loramux.server.lora import base_linear_shapes
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams
from loramux.server.synthetic import write_random_adapter

BLOCK = 16
POOL_BLOCKS = 10
SYSTEM = (
    "You are a careful assistant for a shipping company. Answer in plain words, name the "
    "port of origin and the port of arrival, give weights in tonnes and never guess a date."
)
STORY = "Write a long story about a lighthouse keeper and a storm."


# ---- the block pool alone ----
def test_block_pool_refcounts_prefix_hits_and_lru_eviction() -> None:
    pool = BlockPool(4, BLOCK)
    a = pool.allocate(2)
    assert a == [0, 1] and pool.used == 2
    pool.register(a[0], b"d0")
    pool.register(a[1], b"d1")
    b = pool.lookup([b"d0", b"d1", b"d2"])  # a second holder of the same prefix
    assert b == [0, 1] and pool.used == 2
    pool.release(a)
    assert pool.used == 2  # still held by b
    pool.release(b)
    assert pool.used == 0 and pool.available == 4 and pool.cached_blocks == 2
    # Free blocks go first, then cached ones, least recently released first: a request's
    # tail (d1) was released before its head (d0).
    fresh = pool.allocate(3)
    assert fresh is not None and set(fresh[:2]) == {2, 3} and fresh[2] == 1
    assert pool.lookup([b"d0"]) == [0]
    assert pool.lookup([b"d1"]) == []  # evicted
    assert pool.allocate(1) is None  # every block held
    pool.release(fresh)
    pool.release([0])
    assert pool.used == 0


def test_block_pool_without_prefix_caching_keeps_nothing() -> None:
    pool = BlockPool(2, BLOCK, prefix_caching=False)
    blocks = pool.allocate(2)
    assert blocks is not None
    pool.register(blocks[0], b"d0")
    pool.release(blocks)
    assert pool.lookup([b"d0"]) == [] and pool.cached_blocks == 0


# ---- the engine against the reference ----
@pytest.fixture(scope="module")
def adapter_dirs(
    tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel
) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(smollm2.path)))
    linears = base_linear_shapes(skeleton)
    root = tmp_path_factory.mktemp("kv-adapters")
    return {
        "kv": write_random_adapter(root / "kv", linears, rank=8, targets=None, seed=1, scale=0.02),
        "kv2": write_random_adapter(
            root / "kv2", linears, rank=8, targets=None, seed=2, scale=0.02
        ),
    }


class Reference:
    """Each request alone: greedy over the NF4 base (or PeftModel), HF's own KV cache."""

    def __init__(self, smollm2: ResolvedModel, dirs: dict[str, Path]) -> None:
        self.model = peft_with_adapters(smollm2, dirs)
        self.memo: dict[tuple[tuple[int, ...], str | None, int], list[int]] = {}
        # per generated position, PEFT's nearly tied best tokens (api_helpers.near_tie)
        self.ties: dict[tuple[tuple[int, ...], str | None, int], list[tuple[int, ...] | None]] = {}

    def assert_as_alone(
        self, got: list[int], ids: list[int], adapter: str | None, new_tokens: int
    ) -> None:
        """`got` is PEFT's greedy tokens for the request alone, or parts from them only where
        PEFT's own best logits were nearly tied: a row batched beside others is summed in
        another order, and which requests share its passes depends on when they arrive."""
        want = self.greedy(ids, adapter, new_tokens)
        ties = self.ties[(tuple(ids), adapter, new_tokens)]
        assert len(got) == len(want), adapter
        tokens_before_parting(got, want, ties, adapter)

    def greedy(self, ids: list[int], adapter: str | None, new_tokens: int) -> list[int]:
        """`new_tokens` greedy tokens, EOS included and not stopping (as ignore_eos)."""
        key = (tuple(ids), adapter, new_tokens)
        if key in self.memo:
            return self.memo[key]
        from transformers import DynamicCache

        context: Any = self.model.disable_adapter() if adapter is None else torch.inference_mode()
        if adapter is not None:
            self.model.set_adapter(adapter)
        out: list[int] = []
        ties: list[tuple[int, ...] | None] = []
        with context, torch.inference_mode():
            cache = DynamicCache()
            step = torch.tensor([ids])
            for _ in range(new_tokens):
                logits = self.model(input_ids=step, past_key_values=cache, use_cache=True).logits
                token = int(logits[0, -1].argmax())
                out.append(token)
                ties.append(near_tie(logits[0, -1]))
                step = torch.tensor([[token]])
        self.memo[key] = out
        self.ties[key] = ties
        return out


@pytest.fixture(scope="module")
def reference(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Reference:
    return Reference(smollm2, adapter_dirs)


def _engine(smollm2: ResolvedModel, dirs: dict[str, Path], **settings: Any) -> Engine:
    engine = Engine(
        load_base_model(smollm2, "nf4", "cpu"),
        load_tokenizer(smollm2),
        Settings(**settings),
        smollm2,
        lora_kernel="eager",
    )
    for name, folder in dirs.items():
        engine.adapters.register(name, folder)
    return engine


def _tiny_engine(tiny_llama: ResolvedModel, **settings: Any) -> Engine:
    """The tiny random Llama, KV blocks of BLOCK tokens, the eager LoRA kernel."""
    return Engine(
        load_base_model(tiny_llama, "nf4", "cpu"),
        load_tokenizer(tiny_llama),
        Settings(kv_block_size=BLOCK, **settings),
        tiny_llama,
        lora_kernel="eager",
    )


def _block_bytes(smollm2: ResolvedModel) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(smollm2.path))  # a Llama: no head_dim field needed
    return PagedKVCache.bytes_per_block(
        num_layers=config.num_hidden_layers,
        block_size=BLOCK,
        kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        dtype=torch.bfloat16,
    )


@pytest.fixture(scope="module")
def small_pool(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    """10 blocks (160 tokens): three ~45-token requests growing by 12 tokens do not fit."""
    engine = _engine(
        smollm2,
        adapter_dirs,
        kv_cache_bytes=POOL_BLOCKS * _block_bytes(smollm2),
        kv_block_size=BLOCK,
        max_batch_size=8,
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def chunked(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    """A roomy pool and at most 24 tokens per step: long prompts are prefilled in chunks."""
    engine = _engine(smollm2, adapter_dirs, max_batch_tokens=24, kv_block_size=BLOCK)
    yield engine
    engine.shutdown()


def _chat(engine: Engine, user: str, system: str | None = None) -> list[int]:
    messages = [("system", system)] if system else []
    return engine.render_chat([*messages, ("user", user)])


def _request(ids: list[int], adapter: str | None, new_tokens: int, rid: str) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return GenerationRequest(rid, ids, params, adapter)


def _tokens(stream: RequestStream) -> tuple[list[int], FinishReason | None]:
    tokens: list[int] = []
    reason = None
    for event in stream:
        tokens.extend(event.token_ids)
        reason = event.finish_reason
        assert event.error is None, event.error
    return tokens, reason


class PassLog:
    """Records the engine's forward passes: ("prefill", padded tokens) / ("decode", rows).

    A mixed pass (decode rows and prefill chunks together) is recorded as both, its
    ("prefill", chunk tokens) first, in the same step; `forwards` counts passes per step.
    """

    def __init__(self, engine: Engine) -> None:
        self.passes: list[tuple[str, int]] = []
        self.steps: list[int] = []  # the engine step each pass ran in
        self.forwards: dict[int, int] = {}  # step -> forward passes over the model
        runner = engine.runner
        prefill, decode, mixed = runner.prefill, runner.decode, runner.mixed

        def note(kind: str, n: int) -> None:
            self.passes.append((kind, n))
            self.steps.append(engine._steps)

        def logged_prefill(batch: Any) -> torch.Tensor:
            note("prefill", len(batch.prompts) * max(map(len, batch.prompts)))
            self._forward(engine._steps)
            return prefill(batch)

        def logged_decode(batch: Any) -> torch.Tensor:
            note("decode", len(batch.tokens))
            self._forward(engine._steps)
            return decode(batch)

        def logged_mixed(decoding: Any, chunks: Any) -> tuple[torch.Tensor, torch.Tensor]:
            note("prefill", sum(map(len, chunks.prompts)))
            note("decode", len(decoding.tokens))
            self._forward(engine._steps)
            return mixed(decoding, chunks)

        runner.prefill, runner.decode = logged_prefill, logged_decode  # type: ignore[method-assign]
        runner.mixed = logged_mixed  # type: ignore[method-assign]
        self._restore = (prefill, decode, mixed)
        self._runner = runner

    def _forward(self, step: int) -> None:
        self.forwards[step] = self.forwards.get(step, 0) + 1

    def close(self) -> None:
        runner = self._runner
        runner.prefill, runner.decode, runner.mixed = self._restore  # type: ignore[method-assign]


def test_model_info_and_stats_report_the_pool(small_pool: Engine, smollm2: ResolvedModel) -> None:
    info, stats = small_pool.info, small_pool.stats()
    assert info.kv_blocks_total == stats.kv_blocks_total == POOL_BLOCKS
    assert info.kv_block_size == BLOCK
    assert info.kv_cache_bytes == stats.kv_cache_bytes == POOL_BLOCKS * _block_bytes(smollm2)
    assert stats.kv_blocks_used == 0


def test_default_pool_holds_a_full_context_window(chunked: Engine) -> None:
    assert chunked.info.kv_blocks_total * BLOCK >= chunked.context_length


def test_request_that_can_never_fit_is_refused_up_front(small_pool: Engine) -> None:
    ids = _chat(small_pool, "Hello")
    with pytest.raises(ResourceExhausted) as caught:
        small_pool.submit(_request(ids, None, 300 - len(ids), "too-long"))
    assert caught.value.field == "max_new_tokens"
    message = caught.value.message
    assert "--kv-cache-bytes" in message and f"{POOL_BLOCKS} blocks" in message


def test_preempted_requests_resume_with_the_tokens_they_would_have_had_alone(
    small_pool: Engine, reference: Reference
) -> None:
    plan = [
        (STORY, None),
        ("Describe a busy harbour at dawn in detail.", "kv"),
        ("Tell me about the history of sailing ships.", "kv2"),
    ]
    # Few new tokens: each is a chance for a near-tie to flip between batched and alone
    # (docs/engine.md, Correctness); 12 are enough to overflow the pool.
    new_tokens = 12
    prompts = [_chat(small_pool, user) for user, _ in plan]
    blocks = [-(-(len(p) + new_tokens) // BLOCK) for p in prompts]
    assert sum(blocks) > POOL_BLOCKS and max(blocks) <= POOL_BLOCKS
    before = small_pool.stats()
    streams = [
        small_pool.submit(_request(ids, adapter, new_tokens, f"pre{i}"))
        for i, (ids, (_, adapter)) in enumerate(zip(prompts, plan, strict=True))
    ]
    results = [_tokens(s) for s in streams]
    after = small_pool.stats()
    assert after.preemptions > before.preemptions
    for (tokens, reason), ids, (_, adapter) in zip(results, prompts, plan, strict=True):
        assert reason is FinishReason.LENGTH
        reference.assert_as_alone(tokens, ids, adapter, new_tokens)
    assert after.kv_blocks_used == 0


def test_chunked_prefill_gives_the_same_tokens_and_interleaves_with_decode(
    chunked: Engine, reference: Reference
) -> None:
    """A long prompt's chunks run in the decode pass of three rows on different adapters
    (and none): every request gets PeftModel's tokens alone, one pass per step."""
    plan = [("Name a color.", "kv"), ("Name a fruit.", "kv2"), ("Name a city.", None)]
    # 16 tokens outlast the long prompt's chunks; every token more is one more chance for
    # a near-tie to flip between 3 rows batched and 1 alone (docs/engine.md, Correctness).
    new_tokens = 16
    log = PassLog(chunked)
    try:
        shorts = [_chat(chunked, user) for user, _ in plan]
        running = [
            iter(chunked.submit(_request(ids, adapter, new_tokens, f"short{i}")))
            for i, (ids, (_, adapter)) in enumerate(zip(shorts, plan, strict=True))
        ]
        firsts = [next(stream) for stream in running]  # decoding before the long prompt
        log.passes.clear()
        log.steps.clear()
        long_ids = _chat(chunked, STORY, system=SYSTEM * 2)
        assert len(long_ids) > 4 * 24  # five chunks or more
        long = chunked.submit(_request(long_ids, "kv", 8, "long"))
        long_tokens, _ = _tokens(long)
        rests = [_tokens(stream)[0] for stream in running]  # type: ignore[arg-type]
    finally:
        log.close()
    reference.assert_as_alone(long_tokens, long_ids, "kv", 8)
    for first, rest, ids, (_, adapter) in zip(firsts, rests, shorts, plan, strict=True):
        reference.assert_as_alone(list(first.token_ids) + rest, ids, adapter, new_tokens)
    prefills = [n for kind, n in log.passes if kind == "prefill"]
    assert max(prefills) <= 24 and len(prefills) >= len(long_ids) // 24
    # Between the long prompt's first and last chunk the short requests kept decoding...
    kinds = [kind for kind, _ in log.passes]
    first_chunk = kinds.index("prefill")
    last_chunk = len(kinds) - 1 - kinds[::-1].index("prefill")
    assert kinds[first_chunk:last_chunk].count("decode") >= len(prefills) - 1
    # ...and a step that decoded and prefilled made one pass over the weights, not two.
    steps_with = {
        kind: {step for (k, _), step in zip(log.passes, log.steps, strict=True) if k == kind}
        for kind in ("prefill", "decode")
    }
    both = steps_with["prefill"] & steps_with["decode"]
    assert len(both) >= len(prefills) - 1
    assert {log.forwards[step] for step in both} == {1}


def test_steps_with_decoding_rows_prefill_at_most_the_budget_while_decoding(
    tiny_llama: ResolvedModel,
) -> None:
    """--max-prefill-tokens-while-decoding caps a step's prefill only while rows decode."""
    engine = _tiny_engine(tiny_llama, max_batch_tokens=64, max_prefill_tokens_while_decoding=8)
    log = PassLog(engine)
    try:
        running = engine.submit(_request(list(range(100, 120)), None, 12, "short"))
        next(iter(running))  # decoding before the long prompt arrives
        log.passes.clear()
        log.steps.clear()
        long = engine.submit(_request(list(range(200, 400)), None, 2, "long"))
        long_tokens, long_reason = _tokens(long)
        _, short_reason = _tokens(running)
    finally:
        log.close()
        engine.shutdown()
    assert long_reason is short_reason is FinishReason.LENGTH and len(long_tokens) == 2
    steps: dict[int, dict[str, int]] = {}
    for (kind, n), step in zip(log.passes, log.steps, strict=True):
        steps.setdefault(step, {"prefill": 0, "decode": 0})[kind] += n
    mixed = [s["prefill"] for s in steps.values() if s["decode"] and s["prefill"]]
    alone = [s["prefill"] for s in steps.values() if not s["decode"] and s["prefill"]]
    assert len(mixed) >= 5 and max(mixed) <= 8  # the long prompt crept in beside the decode
    assert max(alone) == 64  # once nothing decodes, chunks take the whole step budget
    assert sum(mixed) + sum(alone) == 200


def test_a_burst_of_short_prompts_beside_decoding_rows_is_prefilled_in_one_pass(
    tiny_llama: ResolvedModel,
) -> None:
    """Prompts that fit --max-prefill-tokens-while-decoding whole, arriving together while
    a row decodes, join one mixed pass (within --max-batch-tokens), not one or two a step:
    each step is a pass over every weight (and every adapter the batch names), so 30 gRPC
    calls arriving over ~20 ms took 15 passes (docs/performance.md, issue 13). A prompt
    longer than the cap still creeps in at most the cap per step (the test above)."""
    engine = _tiny_engine(tiny_llama, max_batch_tokens=128, max_prefill_tokens_while_decoding=16)
    burst = [list(range(300 + 20 * i, 310 + 20 * i)) for i in range(6)]  # 6 x 10 tokens
    log = PassLog(engine)
    try:
        running = engine.submit(_request(list(range(100, 120)), None, 12, "decoding"))
        next(iter(running))  # decoding before the burst arrives
        log.passes.clear()
        log.steps.clear()
        # Submitted on the engine thread between two steps: all six wait at the next step.
        streams = engine.run_on_engine_thread(
            lambda: [
                engine.submit(_request(ids, None, 2, f"burst{i}")) for i, ids in enumerate(burst)
            ]
        )
        results = [_tokens(stream) for stream in streams]
        _tokens(running)
    finally:
        log.close()
        engine.shutdown()
    assert all(reason is FinishReason.LENGTH and len(t) == 2 for t, reason in results)
    steps: dict[int, dict[str, int]] = {}
    for (kind, n), step in zip(log.passes, log.steps, strict=True):
        steps.setdefault(step, {"prefill": 0, "decode": 0})[kind] += n
    prefilled = [(s["prefill"], s["decode"]) for s in steps.values() if s["prefill"]]
    # one step prefilled all 60 prompt tokens, beside the decoding row
    assert prefilled == [(60, 1)], prefilled


def test_chunks_beside_decoding_rows_shrink_as_their_context_grows(
    tiny_llama: ResolvedModel,
) -> None:
    """--max-prefill-attention-while-decoding: a chunk of w tokens after c cached ones,
    in a step that also decodes, keeps w x (c + w) within the budget (at least 1 token)."""
    area = 16 * 40
    engine = _tiny_engine(
        tiny_llama,
        max_batch_tokens=64,
        max_prefill_tokens_while_decoding=16,
        max_prefill_attention_while_decoding=area,
    )
    chunks: list[tuple[int, int, int]] = []  # (step, cached before, tokens)
    prefill, mixed = engine.runner.prefill, engine.runner.mixed

    def note(batch: Any) -> None:
        for start, prompt in zip(
            batch.starts or [0] * len(batch.prompts), batch.prompts, strict=True
        ):
            chunks.append((engine._steps, start, len(prompt)))

    def logged(batch: Any) -> torch.Tensor:
        note(batch)
        return prefill(batch)

    def logged_mixed(decoding: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        note(batch)
        return mixed(decoding, batch)

    engine.runner.prefill = logged  # type: ignore[method-assign]
    engine.runner.mixed = logged_mixed  # type: ignore[method-assign]
    log = PassLog(engine)
    try:
        running = engine.submit(_request(list(range(100, 110)), None, 400, "short"))
        next(iter(running))
        chunks.clear()
        log.passes.clear()
        log.steps.clear()
        long = engine.submit(_request(list(range(200, 500)), None, 2, "long"))
        long_tokens, long_reason = _tokens(long)
        _tokens(running)
    finally:
        log.close()
        engine.shutdown()
    assert long_reason is FinishReason.LENGTH and len(long_tokens) == 2
    decoding_steps = {
        step for (kind, _), step in zip(log.passes, log.steps, strict=True) if kind == "decode"
    }
    beside = [(c, w) for step, c, w in chunks if step in decoding_steps]
    # every prompt token but the last (that one runs in the decode pass, with the others)
    assert sum(w for _, _, w in chunks) == 299 and len(beside) == len(chunks)
    assert max(w for _, w in beside) == 16  # the token budget while the context is short
    for cached, width in beside:
        assert width * (cached + width) <= area or width == 1, (cached, width)
    assert min(w for _, w in beside) < 4  # deep in the prompt the chunks shrank


def test_prefix_hit_skips_the_shared_blocks_and_gives_the_same_tokens(
    chunked: Engine, reference: Reference
) -> None:
    first = _chat(chunked, "Where does the ship from Rotterdam go?", system=SYSTEM)
    second = _chat(chunked, "How heavy is the cargo on the ship to Oslo?", system=SYSTEM)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= 2 * BLOCK
    _tokens(chunked.submit(_request(first, "kv", 4, "warm")))

    def run(ids: list[int], adapter: str | None) -> tuple[list[int], int, int]:
        before = chunked.stats()
        tokens, _ = _tokens(chunked.submit(_request(ids, adapter, 8, "hit")))
        after = chunked.stats()
        return (
            tokens,
            after.prefix_hit_tokens - before.prefix_hit_tokens,
            after.prefill_tokens_total - before.prefill_tokens_total,
        )

    tokens, hit, computed = run(second, "kv")
    assert hit == shared // BLOCK * BLOCK  # every full block of the shared prefix
    assert computed == len(second) - hit
    assert tokens == reference.greedy(second, "kv", 8)
    # Another adapter (it changes every layer's keys and values) and the base model do not
    # reuse the blocks "kv" computed; their tokens are their own.
    for adapter in ("kv2", None):
        tokens, hit, computed = run(second, adapter)
        assert hit == 0 and computed == len(second)
        assert tokens == reference.greedy(second, adapter, 8)
    assert chunked.stats().kv_blocks_used == 0


def test_requests_arriving_together_prefill_their_shared_prefix_once(
    chunked: Engine, reference: Reference
) -> None:
    users = ["Which port is busiest?", "What does a tonne weigh?", "Name a cargo ship."]
    # A system prompt no earlier test sent: nothing of it is cached yet.
    system = (
        "You route freight trains across the Alps for a Swiss operator; answer with the "
        "names of the stations on the route, in order, and nothing else."
    )
    prompts = [_chat(chunked, user, system=system) for user in users]
    shared = min(
        next(i for i, (a, b) in enumerate(zip(prompts[0], p, strict=False)) if a != b)
        for p in prompts[1:]
    )
    full_blocks = shared // BLOCK * BLOCK
    assert full_blocks >= 2 * BLOCK
    before = chunked.stats()
    streams = [
        chunked.submit(_request(ids, "kv", 4, f"together{i}")) for i, ids in enumerate(prompts)
    ]
    results = [_tokens(s)[0] for s in streams]
    after = chunked.stats()
    computed = after.prefill_tokens_total - before.prefill_tokens_total
    assert computed == sum(len(p) for p in prompts) - 2 * full_blocks
    assert after.prefix_hit_tokens - before.prefix_hit_tokens == 2 * full_blocks
    for tokens, ids in zip(results, prompts, strict=True):
        assert tokens == reference.greedy(ids, "kv", 4)


def _all_finish(streams: list[RequestStream], within: float = 300.0) -> list[list[int]]:
    """Every stream's tokens; fails (instead of hanging the run) if one has not ended
    `within` seconds: a request the engine forgot waits forever."""
    results: list[list[int] | None] = [None] * len(streams)

    def drain() -> None:
        for i, stream in enumerate(streams):
            results[i] = _tokens(stream)[0]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    reader.join(within)
    ended = [r for r in results if r is not None]
    assert len(ended) == len(streams), f"{len(ended)} of {len(streams)} requests ended"
    return ended


def test_a_request_waiting_for_a_shared_prefix_runs_when_the_one_computing_it_ends(
    chunked: Engine, reference: Reference
) -> None:
    """The one computing the shared blocks ends in the step that finishes its prompt
    (max_new_tokens 1, as a scoring or classifying client sends): nothing else is running
    then, so the engine must wake for the ones that waited for those blocks (it slept with
    them queued: found by bench.scoring)."""
    system = (
        "You grade essays on maritime law for a Dutch university; answer with a single "
        "letter from A to F and nothing else, whatever the essay says."
    )
    prompts = [_chat(chunked, user, system=system) for user in ("Essay one.", "Essay two.")]
    streams = [
        chunked.submit(_request(ids, None, 1, f"one-token{i}")) for i, ids in enumerate(prompts)
    ]
    results = _all_finish(streams)
    for tokens, ids in zip(results, prompts, strict=True):
        assert tokens == reference.greedy(ids, None, 1)


def test_a_request_waiting_for_blocks_runs_when_the_one_holding_them_ends(
    small_pool: Engine,
) -> None:
    """Two prompts that cannot share the pool, one token each: the second waits for the
    first's blocks, and the first returns them in the step it was admitted in."""
    long_user = " ".join(["Describe the harbour of Rotterdam in one word."] * 8)
    first = _chat(small_pool, long_user)
    second = _chat(small_pool, "Now Antwerp. " + long_user)
    needed = -(-(len(first) + 1) // BLOCK) + -(-(len(second) + 1) // BLOCK)
    assert needed > POOL_BLOCKS and len(second) < POOL_BLOCKS * BLOCK
    streams = [
        small_pool.submit(_request(ids, None, 1, f"pool{i}"))
        for i, ids in enumerate([first, second])
    ]
    assert [len(t) for t in _all_finish(streams)] == [1, 1]


def test_metrics_report_the_pool_and_its_use(small_pool: Engine) -> None:
    from prometheus_client import generate_latest

    from loramux.server.metrics import Metrics

    text = generate_latest(Metrics(small_pool).registry).decode()
    stats = small_pool.stats()
    assert f"loramux_kv_cache_blocks_total {float(stats.kv_blocks_total)}" in text
    assert "loramux_kv_cache_blocks_used 0.0" in text
    assert "loramux_kv_cache_usage_ratio 0.0" in text
    assert f"loramux_preemptions_total {float(stats.preemptions)}" in text
    assert f"loramux_prefix_cache_hit_tokens_total {float(stats.prefix_hit_tokens)}" in text
