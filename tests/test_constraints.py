"""Issue 26: the constraint specs' limits and the grammar cache (compile time bound, LRU,
shared compiles, errors naming the field), with SmolLM2's tokenizer and no model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from loramux.core.errors import InvalidArgument
from loramux.core.models import ResolvedModel
from loramux.server.constraints.compiler import GrammarCache
from loramux.server.constraints.masks import apply_masks
from loramux.server.constraints.spec import ConstraintSpec
from loramux.server.requests import SamplingParams


@pytest.fixture(scope="module")
def cache(smollm2: ResolvedModel) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    # wider than the tokenizer: the model's logits may be padded past its vocabulary
    grammars = GrammarCache(
        tokenizer, len(tokenizer) + 64, [2], capacity=2, timeout=30, threads=2, memory_bytes=1 << 30
    )
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


# takes xgrammar seconds to compile (60 pattern-bound strings: 3.8 s measured), and ~12 MB
SLOW = {
    "type": "object",
    "properties": {
        f"p{i}": {"type": "string", "pattern": r"[a-z]{1,20}@[a-z]{2,10}\.(com|org|net)"}
        for i in range(60)
    },
}


def test_a_compile_that_overruns_is_killed_and_leaves_nothing_busy(
    cache: GrammarCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compile that outruns the bound is refused naming the field, and what ran it is
    gone: its worker process was killed (its memory returned), no compile is in flight (no
    pool thread still works on it), and the next compile is served by a fresh worker."""
    cache.compile(ConstraintSpec.regex("[0-9]+", "r"))  # a worker is up
    _, before = cache.busy()
    assert before
    monkeypatch.setattr(cache, "timeout", 0.3)
    with pytest.raises(InvalidArgument) as caught:
        cache.compile(ConstraintSpec.json_schema(SLOW, "guided_json"))
    assert caught.value.field == "guided_json" and "longer than 0.3 s" in caught.value.message
    pending, after = cache.busy()
    assert pending == 0
    killed = set(before) - set(after)
    assert killed, (before, after)
    for pid in killed:  # not running, and reaped: no zombie either
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    monkeypatch.setattr(cache, "timeout", 30)
    assert cache.compile(ConstraintSpec.regex("fast", "r")) is not None


def test_a_compile_runs_under_its_memory_bound(smollm2: ResolvedModel) -> None:
    """With 1 MiB for a compile, the worker's address space (RLIMIT_AS, soft) is capped at
    what it mapped when the compile began plus 1 MiB: never above its peak plus that. (No
    constraint within the size limits that needs more than the heap the worker already
    holds was found: docs/security.md; this checks that the cap is in force.)"""
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    small = GrammarCache(
        tokenizer, len(tokenizer), [2], capacity=2, timeout=120, threads=1, memory_bytes=1 << 20
    )
    try:
        assert small.compile(ConstraintSpec.regex("[a-c]+", "r")) is not None
        (pid,) = small.busy()[1]
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        (line,) = [x for x in limits if x.startswith("Max address space")]
        soft = line.split()[3]
        assert soft != "unlimited", line
        peak_kb = next(
            int(x.split()[1])
            for x in Path(f"/proc/{pid}/status").read_text().splitlines()
            if x.startswith("VmPeak:")
        )
        assert int(soft) <= peak_kb * 1024 + (1 << 20)
    finally:
        small.close()


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
