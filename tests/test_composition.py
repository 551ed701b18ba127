"""Per-request adapter weights and composition against PEFT on the real 4-bit SmolLM2.

Reference: PEFT's `add_weighted_adapter(..., combination_type="cat")` for several
adapters (and its "linear" combination, which PEFT takes for a single one) on a separately
loaded copy of the same NF4 base, each request run alone; the engine serves all of them,
plain adapters and base rows in one mixed batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from api_helpers import (
    engine_with_adapters,
    linear_shapes,
    near_tie,
    peft_with_adapters,
    tokens_before_parting,
    write_adapter_plan,
)

from loramux.core.errors import InvalidArgument, NotFound
from loramux.core.models import ResolvedModel
from loramux.server.composition import WeightedAdapter, check_weights
from loramux.server.engine import Engine
from loramux.server.requests import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.peft_reference]

NEW_TOKENS = 10
# (name, rank, alpha, rsLoRA, targets)
ADAPTERS = [
    ("all8", 8, 16.0, False, None),
    ("qv16rs", 16, 8.0, True, ("q_proj", "v_proj")),
    ("mlp32", 32, 64.0, False, ("gate_proj", "up_proj", "down_proj")),
]
# What requests ask: (adapter, weight) lists. The first part of each PEFT composition is
# not rsLoRA: PEFT's new adapter keeps the first part's use_rslora (see docs/api.md).
# Weights stay moderate: random adapters at large weights drive this small model into
# outputs whose top logits are all tied, where no comparison can tell anything.
REQUESTS: list[list[tuple[str, float]]] = [
    [("all8", 0.7), ("qv16rs", -0.5)],
    [("mlp32", 0.6), ("all8", 0.4), ("qv16rs", 0.8)],
    [("mlp32", 0.5)],  # one adapter at half strength
    [("all8", 1.0)],  # the adapter itself
    [("all8", 0.0)],  # weight 0: the base model
    [("qv16rs", 1.0)],  # with the plain adapters, 6 distinct slots: the routed BGMV kernel
    [("mlp32", 1.0)],
]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def adapter_dirs(
    tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return write_adapter_plan(root, linear_shapes(smollm2.path), ADAPTERS, seed_offset=10)


@pytest.fixture(scope="module")
def engine(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    engine = engine_with_adapters(
        smollm2, adapter_dirs, max_loaded_adapters=6, max_cpu_adapters=8, max_batch_size=16
    )
    yield engine
    engine.shutdown()


def _peft_outputs(
    smollm2: ResolvedModel, dirs: dict[str, Path], prompts: list[list[int]]
) -> dict[tuple[int, int], tuple[list[int], list[tuple[int, int] | None]]]:
    """Per (request, prompt): PEFT's greedy tokens and, per position, its top two tokens
    when they are nearly tied (else None)."""
    model = peft_with_adapters(smollm2, {n: dirs[n] for n in ("all8", "qv16rs", "mlp32")})
    outputs = {}
    for r, parts in enumerate(REQUESTS):
        names, weights = [n for n, _ in parts], [w for _, w in parts]
        if weights == [0.0]:
            context = model.disable_adapter()
        elif weights == [1.0]:  # the adapter as is (PEFT's copy would keep rsLoRA's factor)
            model.set_adapter(names[0])
            context = torch.inference_mode()
        else:
            model.add_weighted_adapter(names, weights, f"req{r}", combination_type="cat")
            model.set_adapter(f"req{r}")
            context = torch.inference_mode()
        with context, torch.inference_mode():
            for p, ids in enumerate(prompts):
                out = model.generate(
                    input_ids=torch.tensor([ids]),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                ties = [near_tie(scores[0]) for scores in out.scores]
                outputs[r, p] = (out.sequences[0, len(ids) :].tolist(), ties)
    return outputs


def test_weighted_and_composed_adapters_match_peft_in_one_mixed_batch(
    engine: Engine, smollm2: ResolvedModel, adapter_dirs: dict[str, Path]
) -> None:
    prompts = [engine.render_chat([("user", p)]) for p in PROMPTS]
    ids = [
        engine.adapters.weighted([WeightedAdapter(n, w) for n, w in parts]) for parts in REQUESTS
    ]
    assert ids[3] == "all8" and ids[4] is None  # weight 1 is the adapter, weight 0 the base
    streams = {
        (r, p): engine.submit(
            GenerationRequest(
                f"r{r}p{p}",
                prompt,
                SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                adapter_id,
            )
        )
        for r, adapter_id in enumerate(ids)
        for p, prompt in enumerate(prompts)
    }
    got = {key: [t for e in stream for t in e.token_ids] for key, stream in streams.items()}
    expected = _peft_outputs(smollm2, adapter_dirs, prompts)
    compared = 0
    for key, tokens in got.items():
        reference, ties = expected[key]
        compared += tokens_before_parting(tokens, reference, ties, (REQUESTS[key[0]], key[1]))
    # Nearly all of it was compared (a near-tie cuts a sequence short now and then).
    assert compared >= 0.8 * len(got) * NEW_TOKENS, compared
    # The same composition asked again is the same slot, not a new one.
    again = engine.adapters.weighted(
        [WeightedAdapter("all8", 0.7), WeightedAdapter("qv16rs", -0.5)]
    )
    assert again == ids[0]


def test_deleting_a_part_drops_its_compositions(
    engine: Engine, adapter_dirs: dict[str, Path]
) -> None:
    store = engine.adapters
    composed = store.weighted([WeightedAdapter("all8", 0.3), WeightedAdapter("mlp32", 0.3)])
    assert composed is not None and composed in store
    store.unregister("mlp32")
    assert composed not in store
    with pytest.raises(NotFound):
        store.weighted([WeightedAdapter("mlp32", 0.5)])
    store.register("mlp32", adapter_dirs["mlp32"])
    assert store.weighted([WeightedAdapter("all8", 0.3), WeightedAdapter("mlp32", 0.3)]) in store


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ([], "adapters"),
        ([("a", 1.0)] * 2, "adapters[1].name"),
        ([(f"a{i}", 1.0) for i in range(5)], "adapters"),
        ([("a", float("nan"))], "adapters[0].weight"),
        ([("a", float("inf"))], "adapters[0].weight"),
        ([("a", 1.0), ("b", -4.5)], "adapters[1].weight"),
        ([("", 1.0)], "adapters[0].name"),
    ],
)
def test_requests_are_bounded(entries: list[tuple[str, float]], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_weights(entries, max_entries=4, max_weight=4.0, field="adapters")
    assert caught.value.field == field
