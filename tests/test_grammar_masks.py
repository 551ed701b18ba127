"""Issue 26, point 2: each constrained row's token mask is filled while the model computes
the step (a helper thread, started before the forward pass), on the real NF4
SmolLM2-135M-Instruct in one in-process engine.

The overlap must change no token: a mixed batch (constrained rows of three kinds beside
free rows, greedy) gives the same tokens with the overlap on and off, and a row whose
unconstrained output is valid under its schema gives that output. A fill that fails (a
fault injected into one row's matcher) ends that request with an error and no other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from loramux.core.config import Settings
from loramux.core.errors import Internal
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.constraints.compiler import CompiledConstraint
from loramux.server.constraints.masks import RowConstraint
from loramux.server.constraints.spec import ConstraintKind, ConstraintSpec
from loramux.server.engine import Engine
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}
# (prompt, constraint or None): unconstrained, row 0 writes exactly a JSON valid under PERSON
ROWS: list[tuple[str, ConstraintSpec | None]] = [
    ('Output the JSON {"name": "Ann", "age": 3}', ConstraintSpec.json_schema(PERSON, "f")),
    ("Say hi.", None),
    ("Is the sky blue? Answer yes or no.", ConstraintSpec.choice(["Yes", "No"], "f")),
    ("What is 2 + 2? Reply with the number only.", ConstraintSpec.regex(r"[0-9]+", "f")),
    ("Count to five.", None),
    ("Invent a person in JSON.", ConstraintSpec.json_schema(PERSON, "f")),
]


@pytest.fixture(scope="module")
def engine(smollm2: ResolvedModel) -> Iterator[Engine]:
    engine = Engine(
        load_base_model(smollm2, "nf4", "cpu"),
        load_tokenizer(smollm2),
        Settings(max_new_tokens_limit=64, max_batch_size=8),
        smollm2,
        lora_kernel="eager",
    )
    yield engine
    engine.shutdown()


def _batch(
    engine: Engine, rows: list[tuple[str, ConstraintSpec | None]]
) -> list[tuple[list[int], FinishReason | None, Exception | None]]:
    """Submit every row at once (greedy, 24 tokens), then read each: token ids, the finish
    reason and the error of each."""
    streams = []
    for i, (prompt, spec) in enumerate(rows):
        params = SamplingParams(max_new_tokens=24, constraint=spec)
        ids = engine.render_chat([("user", prompt)])
        streams.append(engine.submit(GenerationRequest(f"r{i}", ids, params)))
    results = []
    for stream in streams:
        tokens: list[int] = []
        reason, error = None, None
        for event in stream:
            tokens += event.token_ids
            reason = event.finish_reason or reason
            error = event.error or error
        results.append((tokens, reason, error))
    return results


def _assert_obeys(engine: Engine, spec: ConstraintSpec, tokens: list[int]) -> None:
    """The decoded text is what `spec` allows (the kinds ROWS uses)."""
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    if spec.kind is ConstraintKind.JSON_SCHEMA:
        jsonschema.validate(json.loads(text), PERSON)
    elif spec.kind is ConstraintKind.CHOICE:
        assert text in spec.choices, text
    else:
        assert spec.kind is ConstraintKind.REGEX and re.fullmatch(spec.source, text), text


def test_the_overlap_changes_no_token_and_fills_ahead(engine: Engine) -> None:
    engine.masks.overlap = True
    before = engine.masks.snapshot()
    overlapped = _batch(engine, ROWS)
    during = engine.masks.snapshot()
    engine.masks.overlap = False
    try:
        serial = _batch(engine, ROWS)
    finally:
        engine.masks.overlap = True
    after = engine.masks.snapshot()
    free = _batch(engine, [(prompt, None) for prompt, _ in ROWS])
    assert [e for _, _, e in overlapped + serial] == [None] * (2 * len(ROWS))
    assert [t for t, _, _ in overlapped] == [t for t, _, _ in serial]
    # with the overlap every mask was filled ahead, on the helper; without it, none was
    assert during.rows_ahead > before.rows_ahead
    assert during.rows_at_sampling == before.rows_at_sampling
    assert after.rows_ahead == during.rows_ahead
    assert after.rows_at_sampling > during.rows_at_sampling
    # the masks removed nothing: row 0's free greedy output is valid JSON under PERSON
    # and came out the same, token for token, and the free rows are untouched
    assert overlapped[0][0] == free[0][0], (overlapped[0], free[0])
    for i, (_, spec) in enumerate(ROWS):
        if spec is None:
            assert overlapped[i][0] == free[i][0]


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failed_fill_fails_its_request_only(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, overlap: bool
) -> None:
    """Row 2's matcher raises when its mask is filled (a fault injected into it): that
    request ends with an internal error naming the mask, every other row of the batch
    makes the tokens it makes without the fault."""
    good = _batch(engine, ROWS)
    real = CompiledConstraint.matcher
    broken = ROWS[2][1]

    def matcher(self: CompiledConstraint) -> RowConstraint:
        row = real(self)
        if self.spec == broken:

            def fill(bitmask: Any, index: int) -> None:
                raise RuntimeError("injected fault")

            row.fill = fill  # type: ignore[method-assign]
        return row

    monkeypatch.setattr(CompiledConstraint, "matcher", matcher)
    engine.masks.overlap = overlap
    try:
        faulty = _batch(engine, ROWS)
    finally:
        engine.masks.overlap = True
    # Every other row ends as it does without the fault: no error, the same finish reason,
    # and a constrained row's text still obeys its constraint. (Not token for token: the
    # faulty row leaves the batch after its first step, and a batch of another size may
    # round a near-tied logit the other way.)
    for i, (_, spec) in enumerate(ROWS):
        if i == 2:
            continue
        tokens, reason, error = faulty[i]
        assert error is None and reason is good[i][1], (i, faulty[i], good[i])
        if spec is not None and reason is FinishReason.STOP:  # (a cut one is a prefix)
            _assert_obeys(engine, spec, tokens)
    tokens, reason, error = faulty[2]
    assert reason is FinishReason.ERROR and isinstance(error, Internal), faulty[2]
    assert "mask" in error.message and "injected fault" in error.message
    assert tokens == []
