"""Issue 25: token and prompt logprobs against PEFT on the real 4-bit SmolLM2.

Reference: log_softmax of PEFT's logits (the NF4 base in a PeftModel, the request's adapter
set, alone, one unchunked pass over prompt + generated tokens) at the same positions.
Tolerance: as the engine's logits tests, 4% of the position's logit range (a batched,
chunked bf16 pass moves the logits by about 1% of it, docs/engine.md, Correctness).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from api_helpers import engine_with_adapters, linear_shapes, peft_with_adapters, write_adapter_plan

from loramux.core.errors import InvalidArgument
from loramux.core.models import ResolvedModel
from loramux.server.engine import Engine
from loramux.server.requests import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)

pytestmark = [pytest.mark.slow, pytest.mark.peft_reference]

ADAPTERS = [
    ("all8", 8, 16.0, False, None),
    ("qv16rs", 16, 8.0, True, ("q_proj", "v_proj")),
    ("mlp32", 32, 64.0, False, ("gate_proj", "up_proj", "down_proj")),
]
LONG = " ".join(f"Item {i} is a fruit called number {i}." for i in range(12))
PLAN = [  # (adapter, prompt): the long one is prefilled in chunks (--max-batch-tokens 48)
    ("all8", "What is the capital of France?"),
    (None, "Write a haiku about the sea."),
    ("qv16rs", LONG),
    ("mlp32", "Who wrote Hamlet?"),
]
# x the position's logit range, as the logits tests (test_engine.py); measured: at most
# 1.1% over the mixed batch's ~170 positions.
TOLERANCE = 0.04
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def adapter_dirs(
    tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return write_adapter_plan(root, linear_shapes(smollm2.path), ADAPTERS)


@pytest.fixture(scope="module")
def engine(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    engine = engine_with_adapters(
        smollm2, adapter_dirs, max_loaded_adapters=4, max_batch_size=8, max_batch_tokens=48
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def peft(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> object:
    return peft_with_adapters(smollm2, adapter_dirs)


def _peft_logits(peft: object, ids: list[int], adapter: str | None) -> torch.Tensor:
    """PEFT's logits [len(ids), vocab] float32 over the whole sequence, one pass."""
    model = peft
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():  # type: ignore[attr-defined]
                out = model(input_ids=torch.tensor([ids]))  # type: ignore[operator]
        else:
            model.set_adapter(adapter)  # type: ignore[attr-defined]
            out = model(input_ids=torch.tensor([ids]))  # type: ignore[operator]
    return out.logits[0].float()


def _collect(stream: Iterator[TokenEvent]) -> list[TokenEvent]:
    return list(stream)


def _request(
    engine: Engine, i: int, adapter: str | None, prompt: str, **params: object
) -> GenerationRequest:
    ids = engine.render_chat([("user", prompt)])
    sampling = SamplingParams(**{"max_new_tokens": NEW_TOKENS, **params})  # type: ignore[arg-type]
    return GenerationRequest(f"r{i}", ids, sampling, adapter)


def _check(scored: TokenLogprob, logits: torch.Tensor, top: int, where: object) -> float:
    """One position against PEFT's [vocab] logits there: the token's logprob and the
    top-`top` values within tolerance, the alternatives PEFT's own up to near ties.
    Returns the error as a share of the logit range."""
    reference = torch.log_softmax(logits, dim=-1)
    span = float(logits.max() - logits.min())
    error = abs(scored.logprob - float(reference[scored.token_id])) / span
    assert error <= TOLERANCE, (where, scored.logprob, float(reference[scored.token_id]))
    assert len(scored.top) == top, where
    if top:
        want = torch.topk(reference, top).values
        got = torch.tensor([v for _, v in scored.top])
        assert float((got - want).abs().max()) / span <= TOLERANCE, (where, got, want)
        for token, value in scored.top:  # each alternative: its own logprob per PEFT
            assert abs(value - float(reference[token])) / span <= TOLERANCE, (where, token)
        assert [v for _, v in scored.top] == sorted((v for _, v in scored.top), reverse=True)
    return error


def _against_peft(
    engine: Engine, peft: object, request: GenerationRequest, events: list[TokenEvent]
) -> list[float]:
    params = request.params
    prompt = request.prompt_token_ids
    generated = [t for e in events for t in e.token_ids]
    token_scores = [lp for e in events for lp in e.logprobs]
    prompt_scores = [lp for e in events for lp in e.prompt_logprobs]
    logits = _peft_logits(peft, prompt + generated, request.adapter_id)
    errors = []
    if params.prompt_logprobs is not None:
        assert len(prompt_scores) == len(prompt) and prompt_scores[0] is None
        for q in range(1, len(prompt)):
            scored = prompt_scores[q]
            assert scored is not None and scored.token_id == prompt[q]
            errors.append(_check(scored, logits[q - 1], params.prompt_logprobs, ("prompt", q)))
    else:
        assert not prompt_scores
    if params.logprobs is not None:
        assert [s.token_id for s in token_scores] == generated
        for i, scored in enumerate(token_scores):
            position = len(prompt) + i - 1
            errors.append(_check(scored, logits[position], params.logprobs, ("token", i)))
    else:
        assert not token_scores
    return errors


def test_mixed_batch_token_and_prompt_logprobs_match_peft(engine: Engine, peft: object) -> None:
    """Three adapters and a base row in one batch, one prompt prefilled in chunks beside
    decoding rows: every prompt token's and generated token's logprob, and the top-k
    alternatives, are PEFT's log_softmax at that position."""
    requests = [
        _request(engine, i, adapter, prompt, logprobs=3, prompt_logprobs=2)
        for i, (adapter, prompt) in enumerate(PLAN)
    ]
    streams = [engine.submit(r) for r in requests]
    errors = []
    for request, stream in zip(requests, streams, strict=True):
        events = _collect(stream)
        assert events[-1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
        errors += _against_peft(engine, peft, request, events)
    assert len(errors) > 4 * NEW_TOKENS + 100


def test_scoring_with_a_cached_prefix(engine: Engine, peft: object) -> None:
    """A prompt whose blocks another request left in the prefix cache: token logprobs of
    a request that takes the hit, and prompt logprobs of one that asks for them (its
    cached positions are run again: their logits are gone), both PEFT's."""
    warm = _request(engine, 0, "qv16rs", LONG)
    _collect(engine.submit(warm))
    hit_before = engine.stats().prefix_hit_tokens
    decoding = _request(engine, 1, "qv16rs", LONG, logprobs=2)
    errors = _against_peft(engine, peft, decoding, _collect(engine.submit(decoding)))
    took = engine.stats().prefix_hit_tokens - hit_before
    assert took >= engine.blocks.block_size, "the second request should take a prefix hit"
    scoring = _request(engine, 2, "qv16rs", LONG, logprobs=1, prompt_logprobs=0)
    errors += _against_peft(engine, peft, scoring, _collect(engine.submit(scoring)))
    assert engine.stats().prefix_hit_tokens - hit_before == took, "scoring recomputes"
    assert errors


def test_max_new_tokens_zero_scores_the_prompt_only(engine: Engine, peft: object) -> None:
    """lm-eval's loglikelihood shape: prompt logprobs, no new token."""
    request = _request(engine, 0, "mlp32", PLAN[3][1], max_new_tokens=0, prompt_logprobs=1)
    events = _collect(engine.submit(request))
    assert [t for e in events for t in e.token_ids] == []
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert events[-1].completion_tokens == 0
    assert _against_peft(engine, peft, request, events)


def test_bad_logprob_requests_are_refused(engine: Engine) -> None:
    prompt = engine.render_chat([("user", "hi")])
    bad = [
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"max_new_tokens": 0}, "max_new_tokens"),  # no new tokens without prompt scoring
        ({"min_tokens": 9, "max_new_tokens": 4}, "min_tokens"),
        ({"logit_bias": ((10**9, 1.0),)}, "logit_bias"),
        ({"logit_bias": ((5, 101.0),)}, "logit_bias[5]"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
    ]
    for params, field in bad:
        with pytest.raises(InvalidArgument) as info:
            engine.submit(GenerationRequest("bad", prompt, SamplingParams(**params)))  # type: ignore[arg-type]
        assert info.value.field == field, params
