"""Issue 26: the constraint specs' limits and the grammar cache (compile time bound, LRU,
shared compiles, errors naming the field), with SmolLM2's tokenizer and no model."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from loramux.core.errors import InvalidArgument
from loramux.core.models import ResolvedModel
from loramux.server.constraints import compiler as compiler_module
from loramux.server.constraints.compiler import GrammarCache
from loramux.server.constraints.masks import apply_masks
from loramux.server.constraints.spec import ConstraintSpec
from loramux.server.requests import SamplingParams


@pytest.fixture(scope="module")
def cache(smollm2: ResolvedModel) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    # wider than the tokenizer: the model's logits may be padded past its vocabulary
    grammars = GrammarCache(tokenizer, len(tokenizer) + 64, [2], capacity=2, timeout=30, threads=2)
    yield grammars
    grammars.close()


def test_limits_name_the_field() -> None:
    deep: Any = {"type": "integer"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    cases = [
        lambda: ConstraintSpec.json_schema(deep, "f1"),
        lambda: ConstraintSpec.json_schema("[1,", "f2"),
        lambda: ConstraintSpec.json_schema(3, "f3"),
        lambda: ConstraintSpec.regex("a" * 3000, "f4"),
        lambda: ConstraintSpec.choice(["x"] * 300, "f5"),
        lambda: ConstraintSpec.choice([""], "f6"),
        lambda: ConstraintSpec.grammar(" ", "f7"),
    ]
    for i, case in enumerate(cases, 1):
        with pytest.raises(InvalidArgument) as caught:
            case()
        assert caught.value.field == f"f{i}"


def test_min_tokens_and_a_constraint_are_refused_together() -> None:
    spec = ConstraintSpec.choice(["a"], "guided_choice")
    SamplingParams(constraint=spec).validate(64)
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(constraint=spec, min_tokens=2).validate(64)
    assert caught.value.field == "min_tokens"


def test_equal_specs_share_one_compile_and_the_cache_is_bounded(cache: GrammarCache) -> None:
    first = cache.compile(ConstraintSpec.regex("[a-c]+", "r"))
    hits = cache.stats.cache_hits
    assert cache.compile(ConstraintSpec.regex("[a-c]+", "other field")) is first
    assert cache.stats.cache_hits == hits + 1
    cache.compile(ConstraintSpec.regex("x", "r"))
    cache.compile(ConstraintSpec.regex("y", "r"))  # capacity 2: "[a-c]+" is dropped
    assert cache.compile(ConstraintSpec.regex("[a-c]+", "r")) is not first


def test_compile_errors_name_the_field(cache: GrammarCache) -> None:
    for spec in (
        ConstraintSpec.regex("(a", "guided_regex"),
        ConstraintSpec.grammar("root ::= (", "guided_grammar"),
        ConstraintSpec.json_schema({"type": "nonsense"}, "response_format.json_schema.schema"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            cache.compile(spec)
        assert caught.value.field == spec.field
        assert "/project/" not in caught.value.message  # xgrammar's source location cut


def test_a_compile_that_overruns_is_refused_and_others_still_compile(
    cache: GrammarCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow compile (held on an event here) costs its caller `timeout`, a 400 naming the
    field; a compile of another spec on the second pool thread is not held up by it."""
    release = threading.Event()
    real = compiler_module._compile

    def held(compiler: Any, spec: ConstraintSpec) -> Any:
        if spec.source == "slow":
            release.wait(60)
        return real(compiler, spec)

    monkeypatch.setattr(compiler_module, "_compile", held)
    monkeypatch.setattr(cache, "timeout", 0.2)
    try:
        with pytest.raises(InvalidArgument) as caught:
            cache.compile(ConstraintSpec.regex("slow", "guided_regex"))
        assert caught.value.field == "guided_regex" and "compile" in caught.value.message
        monkeypatch.setattr(cache, "timeout", 30)
        assert cache.compile(ConstraintSpec.regex("fast", "r")) is not None
    finally:
        release.set()


def test_masks_touch_only_constrained_rows_and_never_allow_padding_ids(
    cache: GrammarCache,
) -> None:
    compiled = cache.compile(ConstraintSpec.choice(["yes", "no"], "c"))
    row = compiled.matcher()
    logits = torch.randn(3, cache.vocab_size)
    before = logits.clone()
    apply_masks(logits, [None, row, None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(t < cache.vocab_size - 64 for t in allowed)
    bitmask = xgr.allocate_token_bitmask(1, cache.vocab_size)
    row.fill(bitmask, 0)  # the same answer from the matcher directly
    words = bitmask[0].tolist()
    assert allowed == [t for t in range(cache.vocab_size) if words[t // 32] >> (t % 32) & 1]
    wider = torch.randn(2, cache.vocab_size + 40)  # logits wider than the matcher's vocab
    apply_masks(wider, [compiled.matcher(), None])
    assert torch.isfinite(wider[0]).nonzero().flatten().tolist() == allowed
    assert torch.isfinite(wider[1]).all()
