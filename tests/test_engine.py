"""Issue 3: the multi-adapter engine against PEFT on the real 4-bit SmolLM2.

Reference = each request run alone through PEFT's PeftModel (set_adapter / disabled
adapters) on a separately loaded copy of the same NF4 base model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from api_helpers import (
    engine_with_adapters,
    eventually,
    linear_shapes,
    near_tie,
    peft_with_adapters,
    write_adapter_plan,
)

from loramux.core.errors import NotFound
from loramux.core.models import ResolvedModel
from loramux.server.engine import Engine, RequestStream
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.peft_reference]

NEW_TOKENS = 10
# (name, rank, alpha, rsLoRA, targets): different ranks and alphas, rsLoRA among them.
ADAPTERS = [
    ("all8", 8, 16.0, False, None),
    ("qv16rs", 16, 8.0, True, ("q_proj", "v_proj")),
    ("mlp32", 32, 64.0, False, ("gate_proj", "up_proj", "down_proj")),
    ("ko4", 4, 4.0, False, ("k_proj", "o_proj")),
    ("all16", 16, 32.0, False, None),
    ("attn8", 8, 8.0, True, ("q_proj", "k_proj", "v_proj", "o_proj")),
]
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Explain gravity in one sentence.",
    "Name a color of the rainbow.",
]


@pytest.fixture(scope="module")
def adapter_dirs(
    tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return write_adapter_plan(root, linear_shapes(smollm2.path), ADAPTERS)


@pytest.fixture(scope="module")
def engine(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    engine = engine_with_adapters(smollm2, adapter_dirs, max_loaded_adapters=8, max_batch_size=16)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def int8_engine(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    """Adapter slots in int8 with per-row scales (--lora-slot-dtype int8)."""
    engine = engine_with_adapters(
        smollm2, adapter_dirs, max_loaded_adapters=8, max_batch_size=16, lora_slot_dtype="int8"
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def narrow_engine(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    """Two device slots and three CPU entries for six adapters: constant eviction churn."""
    engine = engine_with_adapters(
        smollm2, adapter_dirs, max_loaded_adapters=2, max_cpu_adapters=3, max_batch_size=16
    )
    yield engine
    engine.shutdown()


class PeftReference:
    """Each request alone through PEFT, memoised."""

    def __init__(self, smollm2: ResolvedModel, dirs: dict[str, Path]) -> None:
        self.model = peft_with_adapters(smollm2, dirs)
        self.cache: dict[tuple[tuple[int, ...], str | None, int], list[int]] = {}
        # per generated position: PEFT's two nearly tied top tokens, or None
        self.ties: dict[tuple[tuple[int, ...], str | None, int], list[tuple[int, int] | None]]
        self.ties = {}

    def _context(self, adapter: str | None):  # type: ignore[no-untyped-def]
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return torch.inference_mode()

    def generate(
        self, ids: list[int], adapter: str | None, new_tokens: int = NEW_TOKENS
    ) -> list[int]:
        key = (tuple(ids), adapter, new_tokens)
        if key not in self.cache:
            with self._context(adapter), torch.inference_mode():
                out = self.model.generate(
                    input_ids=torch.tensor([ids]),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            self.cache[key] = out.sequences[0, len(ids) :].tolist()
            self.ties[key] = [near_tie(scores[0]) for scores in out.scores]
        return self.cache[key]

    def logits(self, ids: list[int], adapter: str | None) -> torch.Tensor:
        with self._context(adapter), torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.fixture(scope="module")
def peft(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> PeftReference:
    return PeftReference(smollm2, adapter_dirs)


def _collect(stream: RequestStream) -> tuple[list[int], str, FinishReason | None]:
    tokens: list[int] = []
    text = ""
    reason = None
    for event in stream:
        tokens.extend(event.token_ids)
        text += event.text
        reason = event.finish_reason
    return tokens, text, reason


def _request(
    engine: Engine, i: int, prompt: str, adapter: str | None, **params: object
) -> GenerationRequest:
    ids = engine.render_chat([("user", prompt)])
    sampling = SamplingParams(
        max_new_tokens=int(params.pop("max_new_tokens", NEW_TOKENS)), **params
    )  # type: ignore[arg-type]
    return GenerationRequest(f"r{i}", ids, sampling, adapter)


def _without_eos(tokens: list[int], engine: Engine) -> list[int]:
    return [t for t in tokens if t not in engine.eos_token_ids]


def _against_peft(
    engine: Engine, peft: PeftReference, request: GenerationRequest, tokens: list[int]
) -> tuple[bool, int, bool]:
    """(equal to PEFT alone, tokens equal, parted where PEFT's top two were nearly tied
    with the engine's token one of them: docs/engine.md, Correctness)."""
    expected = peft.generate(request.prompt_token_ids, request.adapter_id)
    got, want = _without_eos(tokens, engine), _without_eos(expected[: len(tokens)], engine)
    pairs = enumerate(zip(got, want, strict=False))
    same_prefix = next((i for i, (g, w) in pairs if g != w), len(got))
    ties = peft.ties[(tuple(request.prompt_token_ids), request.adapter_id, NEW_TOKENS)]
    tie = ties[same_prefix] if got != want and same_prefix < len(ties) else None
    return got == want, same_prefix, tie is not None and got[same_prefix] in tie


def _mixed_batch_against_peft(engine: Engine, peft: PeftReference) -> list[tuple[bool, int, bool]]:
    """One batch of six adapters and base rows; per request: (equal to PEFT, tokens equal,
    parted where PEFT's top two were nearly tied, with the engine's token one of them)."""
    plan = [
        (p, a)
        for p, a in zip(PROMPTS, ["all8", "qv16rs", "mlp32", "ko4", None, "all16"], strict=True)
    ]
    plan += [(PROMPTS[0], None), (PROMPTS[1], "mlp32")]
    requests = [_request(engine, i, p, a) for i, (p, a) in enumerate(plan)]
    streams = [engine.submit(r) for r in requests]  # submitted together: one batch
    results = [_collect(s) for s in streams]
    differs_from_base = 0
    outcome = []
    for request, (tokens, text, reason) in zip(requests, results, strict=True):
        expected = peft.generate(request.prompt_token_ids, request.adapter_id)
        outcome.append(_against_peft(engine, peft, request, tokens))
        assert reason in (FinishReason.LENGTH, FinishReason.EOS)
        assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
        if request.adapter_id is not None:
            differs_from_base += expected != peft.generate(request.prompt_token_ids, None)
    assert differs_from_base >= 3, "adapters too weak to tell apart from the base model"
    return outcome


def test_mixed_batch_matches_peft_token_for_token(engine: Engine, peft: PeftReference) -> None:
    """Each request equals PEFT alone token for token; a sequence may part from PEFT's
    only where PEFT itself was torn between two tokens (near-tie: docs/engine.md,
    Correctness), by taking the other one; nothing after that is comparable."""
    outcome = _mixed_batch_against_peft(engine, peft)
    assert all(equal or at_tie for equal, _, at_tie in outcome), outcome
    assert sum(equal for equal, _, _ in outcome) >= len(outcome) - 1, repr(outcome)


def test_int8_slots_mixed_batch_follows_peft(int8_engine: Engine, peft: PeftReference) -> None:
    """int8 slots move each LoRA delta by a fraction of a percent, which can flip a near-tied
    token (seen once here: one request of eight parted from PEFT at its 7th token). A wrong
    scale or slot would part every adapter row from PEFT within the first tokens."""
    outcome = _mixed_batch_against_peft(int8_engine, peft)
    assert sum(equal for equal, _, _ in outcome) >= 6, outcome
    assert min(prefix for _, prefix, _ in outcome) >= 3, outcome


def test_single_adapter_batches_match_peft(engine: Engine, peft: PeftReference) -> None:
    """Every row on one adapter (and a lone request): the plain-GEMM path. Equal to PEFT
    token for token, parting only where PEFT itself was torn (near-tie), as in the mixed
    batch: decode attention is the paged kernel's where the CPU has one, which rounds as
    SDPA does only up to the last bits of a float32 sum (docs/engine.md)."""
    alone = _request(engine, 0, PROMPTS[2], "mlp32")
    tokens, _, _ = _collect(engine.submit(alone))
    equal, _, at_tie = _against_peft(engine, peft, alone, tokens)
    assert equal or at_tie
    requests = [_request(engine, i, p, "all16") for i, p in enumerate(PROMPTS[:4])]
    streams = [engine.submit(r) for r in requests]
    outcome = [
        _against_peft(engine, peft, request, _collect(stream)[0])
        for request, stream in zip(requests, streams, strict=True)
    ]
    assert all(equal or at_tie for equal, _, at_tie in outcome), repr(outcome)
    # How many part at a tie depends on the summation order of the CPU's path: with the
    # AVX-512 kernels at most one of four did; on an AVX2 CPU (compiled LoRA path, torch
    # attention) two of four parted at PEFT's own near-ties (at tokens 1 and 0).
    assert sum(equal for equal, _, _ in outcome) >= len(outcome) // 2, repr(outcome)


def _prefill_logit_errors(engine: Engine, peft: PeftReference, tie: float = 0.0) -> list[float]:
    """One prefill pass mixing four adapters and a base row, against PEFT row by row:
    max |logit difference| / the row's logit range. The engine's top token must be PEFT's
    top token (or within `tie` of PEFT's top logit)."""
    plan = [
        ("all8", PROMPTS[0]),
        (None, PROMPTS[1]),
        ("qv16rs", PROMPTS[2]),
        ("mlp32", PROMPTS[3]),
        ("ko4", PROMPTS[4]),
    ]
    for name, _ in plan:
        if name:
            engine.adapters.load(name)
    prompts = [engine.render_chat([("user", p)]) for _, p in plan]
    slots = [engine.adapters._entries[n].slot or 0 if n else 0 for n, _ in plan]
    assert len({s for s in slots if s}) == 4
    # On the engine thread between steps: no request can start meanwhile.
    logits = engine.run_on_engine_thread(lambda: engine.prefill_logits(prompts, slots))
    ratios = []
    for row, (name, _) in enumerate(plan):
        expected = peft.logits(prompts[row], name)
        spread = float(expected.max() - expected.min())
        ratios.append(float((logits[row] - expected).abs().max()) / spread)
        top = int(logits[row].argmax())
        assert float(expected[top]) >= float(expected.max()) - tie, (name, top)
    return ratios


def test_mixed_batch_logits_close_to_peft(engine: Engine, peft: PeftReference) -> None:
    """Tolerance: 4% of the row's logit range. For scale, batching alone (right padding,
    bf16) moves the bare base model's logits by up to ~1% of the range on this model."""
    ratios = _prefill_logit_errors(engine, peft)
    assert max(ratios) <= 0.04, ratios


def test_int8_slots_logits_close_to_peft(int8_engine: Engine, peft: PeftReference) -> None:
    """Same tolerance; the top token may be one PEFT ties within two bf16 steps (0.25 at
    logits of 32-64): for qv16rs the bf16 engine's top two logits are equal (30.75), and
    int8 slots put the other one first."""
    ratios = _prefill_logit_errors(int8_engine, peft, tie=0.25)
    assert max(ratios) <= 0.04, ratios


def test_requests_joining_mid_flight_match_alone(engine: Engine, peft: PeftReference) -> None:
    first = engine.submit(
        _request(engine, 0, PROMPTS[3], "all16", max_new_tokens=24, ignore_eos=True)
    )
    events = iter(first)
    for _ in range(5):  # let it decode a few steps before the others join
        next(events)
    late = [
        _request(engine, 1, PROMPTS[0], "qv16rs"),
        _request(engine, 2, PROMPTS[5], None),
        _request(engine, 3, PROMPTS[2], "ko4"),
    ]
    late_streams = [engine.submit(r) for r in late]
    rest = list(events)
    assert rest[-1].finish_reason is FinishReason.LENGTH
    for request, stream in zip(late, late_streams, strict=True):
        equal, _, at_tie = _against_peft(engine, peft, request, _collect(stream)[0])
        assert equal or at_tie, request.adapter_id


def test_more_adapters_than_slots_with_eviction_churn(
    narrow_engine: Engine, peft: PeftReference
) -> None:
    engine = narrow_engine
    names = [a[0] for a in ADAPTERS]
    plan = [(PROMPTS[i % len(PROMPTS)], names[(i * 5) % len(names)]) for i in range(12)]
    requests = [_request(engine, i, p, a) for i, (p, a) in enumerate(plan)]
    streams = [engine.submit(r) for r in requests]
    # Twelve requests, six prompts: the repeats start from the prefix cache. A sequence
    # may part from PEFT only at a near-tie (PROMPTS[2] on all16 is an exact tie at its
    # first token: 28.875 for two tokens in PEFT's own logits).
    outcome = [
        _against_peft(engine, peft, request, _collect(stream)[0])
        for request, stream in zip(requests, streams, strict=True)
    ]
    assert all(equal or at_tie for equal, _, at_tie in outcome), outcome
    totals = engine.adapters.totals()
    assert totals.evictions >= 4 and totals.misses >= 4
    assert sum(s.state == "device" for s in engine.adapters.stats().values()) <= 2


def test_unknown_adapter_is_an_error_never_the_base_model(engine: Engine) -> None:
    with pytest.raises(NotFound) as info:
        engine.submit(_request(engine, 0, PROMPTS[0], "no-such-adapter"))
    assert info.value.field == "adapter"


def test_cancel_frees_the_row_and_deadline_is_honoured(engine: Engine) -> None:
    stream = engine.submit(
        _request(engine, 0, PROMPTS[1], "all8", max_new_tokens=200, ignore_eos=True)
    )
    events = iter(stream)
    next(events)
    stream.cancel()
    rest = list(events)
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    assert rest[-1].completion_tokens < 200
    late = _request(engine, 1, PROMPTS[1], None, max_new_tokens=200, ignore_eos=True)
    late.deadline = time.monotonic() + 0.5
    final = list(engine.submit(late))[-1]
    assert final.finish_reason is FinishReason.DEADLINE
    assert final.error is not None and final.error.code == "DEADLINE_EXCEEDED"


def test_stop_strings_stop_tokens_and_seeds(engine: Engine) -> None:
    base = _collect(engine.submit(_request(engine, 0, PROMPTS[0], None, max_new_tokens=12)))
    assert "Paris" in base[1]
    stopped = _collect(
        engine.submit(_request(engine, 1, PROMPTS[0], None, max_new_tokens=12, stop=("Paris",)))
    )
    assert stopped[2] is FinishReason.STOP
    assert "Paris" not in stopped[1] and base[1].startswith(stopped[1])
    first_token = base[0][0]
    by_token = _collect(
        engine.submit(_request(engine, 2, PROMPTS[0], None, stop_token_ids=(first_token,)))
    )
    assert by_token[2] is FinishReason.STOP and by_token[0] == [first_token]

    def sample(seed: int) -> list[int]:
        request = _request(
            engine, 3, PROMPTS[1], "all8", temperature=1.0, top_p=0.9, top_k=50, seed=seed
        )
        return _collect(engine.submit(request))[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_cold_adapter_loads_once_for_concurrent_requests(engine: Engine) -> None:
    engine.adapters.unload("attn8")
    before = engine.adapters.stats()["attn8"]
    assert before.state == "stored"
    streams = [engine.submit(_request(engine, i, PROMPTS[i], "attn8")) for i in range(4)]
    for stream in streams:
        assert _collect(stream)[2] in (FinishReason.LENGTH, FinishReason.EOS)
    after = engine.adapters.stats()["attn8"]
    assert after.loads == before.loads + 1
    assert after.misses - before.misses >= 1


def test_unload_returns_memory_and_pinned_adapters_stay(narrow_engine: Engine) -> None:
    store = narrow_engine.adapters
    store.load("all8")
    store.pin("all8")
    cpu_with = store.memory()["cpu_bytes"]
    for name in ("qv16rs", "mlp32", "ko4"):
        store.load(name)  # churns the other slot
    assert store.state("all8") == "device"
    store.pin("all8", False)
    for name in [a[0] for a in ADAPTERS]:
        store.unload(name)
    memory = store.memory()
    assert memory["cpu_bytes"] == 0 and memory["device_used_bytes"] == 0 and cpu_with > 0
    assert all(s.state == "stored" for s in store.stats().values())
    store.unload("all8")  # already stored: must not leave an evict request behind
    store.load("all8")
    _collect(narrow_engine.submit(_request(narrow_engine, 0, PROMPTS[0], None, max_new_tokens=2)))
    assert store.state("all8") == "device"  # the engine steps above kept it resident


def test_adapter_in_use_is_not_evicted_by_unload(narrow_engine: Engine) -> None:
    engine = narrow_engine
    stream = engine.submit(
        _request(engine, 0, PROMPTS[0], "all16", max_new_tokens=500, ignore_eos=True)
    )
    events = iter(stream)
    next(events)
    done = threading.Event()

    def unload() -> None:
        engine.adapters.unload("all16")
        done.set()

    worker = threading.Thread(target=unload)
    worker.start()
    # Synchronise on the store's own record of the unload request, not on a sleep: once it
    # is registered, three more tokens generated prove the unload waits for the request.
    entry = engine.adapters._entries["all16"]
    assert eventually(lambda: entry.want_evict)
    for _ in range(3):
        assert not next(events).finished
    assert not done.is_set()
    assert engine.adapters.state("all16") == "device"
    stream.cancel()
    rest = list(events)
    worker.join(30)
    assert done.is_set() and rest[-1].finish_reason is FinishReason.CANCELLED
    assert engine.adapters.state("all16") == "stored"
