"""Issue 27: trainable tokens (PEFT's trainable_token_indices) served on the NF4 base.

An adapter's embedding rows (and, SmolLM2 tying its output layer to its embedding, those
tokens' logit columns) apply to its own rows of the running batch only. The reference is
PEFT itself on a bf16 copy holding the dequantised NF4 weights (`dequantized_copy`, as
tests/test_dora.py: the DoRA adapters in the batch need it), greedy tokens compared by the
near-tie rule of the other PEFT tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import (
    dequantized_copy,
    engine_with_adapters,
    greedy_grid,
    linear_shapes,
    peft_generate,
    peft_on,
    tokens_before_parting,
)
from safetensors.torch import load_file, save_file

from loramux.core.config import Settings
from loramux.core.errors import FailedPrecondition, InvalidArgument, LoramuxError
from loramux.core.models import ResolvedModel, load_tokenizer
from loramux.server.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EmbeddingShape,
    inspect_adapter,
)
from loramux.server.composition import WeightedAdapter
from loramux.server.engine import Engine
from loramux.server.requests import GenerationRequest, SamplingParams
from loramux.server.synthetic import write_random_adapter

pytestmark = [pytest.mark.slow, pytest.mark.peft_reference]

NEW_TOKENS = 10
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M's embedding
EMBEDDING = EmbeddingShape("model.embed_tokens", VOCAB, HIDDEN, max_rows=8)


def _token_ids(smollm2: ResolvedModel) -> dict[str, list[int]]:
    """Per token adapter, ids that the chat-rendered prompts contain: the template's
    markers and words of each prompt (so the rows are read in prefill and in decode)."""
    tokenizer = load_tokenizer(smollm2)
    words = [tokenizer.encode(" France")[0], tokenizer.encode(" sea")[0]]
    markers = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    return {
        "tokens-lora": [markers[1], words[0], markers[0]],
        "tokens-dora": [words[1], markers[0]],
        "tokens-only": [markers[0], markers[1], words[0], words[1]],
    }


def _rows(reference_base: Any, ids: list[int], seed: int) -> torch.Tensor:  # [n, hidden]
    """Replacement rows far from the model's own (4x its rows' spread): outputs change."""
    weight = reference_base.get_input_embeddings().weight.float()
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(ids), weight.shape[1], generator=generator) * 4 * weight.std()


@pytest.fixture(scope="module")
def reference_base(smollm2: ResolvedModel) -> Any:
    return dequantized_copy(smollm2)


@pytest.fixture(scope="module")
def adapter_dirs(
    tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel, reference_base: Any
) -> dict[str, Path]:
    linears = linear_shapes(smollm2.path)
    weights = {name: reference_base.get_submodule(name).weight.float() for name in linears}
    ids = _token_ids(smollm2)
    root = tmp_path_factory.mktemp("tokens")
    plans: dict[str, dict[str, Any]] = {
        "tokens-lora": {"rank": 8, "alpha": 16, "scale": 0.03},
        "tokens-dora": {"rank": 8, "alpha": 16, "scale": 0.03, "dora_weights": weights},
        # LoRA too small to matter: what changes its output is its token rows
        "tokens-only": {"rank": 1, "alpha": 1, "scale": 1e-4, "targets": ("q_proj",)},
        "plain": {"rank": 8, "alpha": 16, "scale": 0.03},
        "dora": {"rank": 8, "alpha": 16, "scale": 0.03, "dora_weights": weights},
    }
    dirs = {}
    for seed, (name, plan) in enumerate(plans.items()):
        tokens = None
        if name in ids:
            tokens = (ids[name], _rows(reference_base, ids[name], 70 + seed))
        dirs[name] = write_random_adapter(
            root / name, linears, seed=60 + seed, trainable_tokens=tokens, **plan
        )
    # PEFT's other form: {layer name: ids}, the input embedding's
    config = json.loads((dirs["tokens-dora"] / CONFIG_FILE).read_text())
    config["trainable_token_indices"] = {"embed_tokens": config["trainable_token_indices"]}
    (dirs["tokens-dora"] / CONFIG_FILE).write_text(json.dumps(config))
    return dirs


@pytest.fixture(scope="module")
def engine(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    engine = engine_with_adapters(smollm2, adapter_dirs, max_loaded_adapters=6, max_batch_size=12)
    yield engine
    engine.shutdown()


Expected = dict[tuple[str | None, int], tuple[list[int], list[tuple[int, ...] | None]]]


@pytest.fixture(scope="module")
def peft_model(reference_base: Any, adapter_dirs: dict[str, Path]) -> Any:
    # PEFT warns of "missing adapter keys" of the adapters loaded before one with trainable
    # tokens: their weights are loaded all the same (checked by hand, PEFT 0.22)
    return peft_on(reference_base, adapter_dirs)


@pytest.fixture(scope="module")
def expected(engine: Engine, peft_model: Any, adapter_dirs: dict[str, Path]) -> Expected:
    """PEFT's greedy tokens and near-ties, per (adapter or None, prompt index)."""
    prompts = [engine.render_chat([("user", p)]) for p in PROMPTS]
    model = peft_model
    return {
        (name, p): peft_generate(model, ids, name, NEW_TOKENS)
        for name in [*adapter_dirs, None]
        for p, ids in enumerate(prompts)
    }


def test_token_rows_lora_dora_and_base_rows_in_one_batch_match_peft(
    engine: Engine, expected: Expected, adapter_dirs: dict[str, Path]
) -> None:
    """Every adapter and the base, both prompts, submitted together (one running batch):
    PEFT's greedy tokens, parting only at PEFT's own near-ties."""
    prompts = [engine.render_chat([("user", p)]) for p in PROMPTS]
    names: list[str | None] = [*adapter_dirs, None]
    got = greedy_grid(engine, names, prompts, NEW_TOKENS)
    for key, tokens in got.items():
        tokens_before_parting(tokens, *expected[key], key)
    # The token rows change PEFT's output (the comparison means something): tokens-only's
    # LoRA is 1e-4 of the others', so its change is the rows'.
    for p in range(len(prompts)):
        assert expected["tokens-only", p][0] != expected[None, p][0], p
        assert got["tokens-only", p] != got[None, p], p


def test_token_rows_in_mixed_passes_match_peft(
    engine: Engine, expected: Expected, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token adapters' prompts prefilled while other rows decode (mixed passes: each token
    of the flattened pass with its own slot): still PEFT's greedy tokens."""
    prompts = [engine.render_chat([("user", p)]) for p in PROMPTS]
    chunk_slots: list[int] = []  # the slots of prompt chunks prefilled in mixed passes
    mixed = engine.runner.mixed

    def spy(decode: Any, prefill: Any) -> Any:
        chunk_slots.extend(prefill.slots)
        return mixed(decode, prefill)

    monkeypatch.setattr(engine.runner, "mixed", spy)

    def submit(name: str | None, p: int) -> Any:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        return engine.submit(GenerationRequest(f"mixed-{name}-{p}", prompts[p], params, name))

    first = {(None, 0): submit(None, 0), ("tokens-lora", 1): submit("tokens-lora", 1)}
    events = {key: iter(stream) for key, stream in first.items()}
    # their first tokens are out: both decode from now on, and the next prompts join them
    got = {key: list(next(it).token_ids) for key, it in events.items()}
    later = {
        (name, p): submit(name, p) for name in ("tokens-only", "tokens-dora", None) for p in (0, 1)
    }
    for key, it in events.items():
        got[key] += [t for e in it for t in e.token_ids]
    for key, stream in later.items():
        got[key] = [t for e in stream for t in e.token_ids]
    for key, tokens in got.items():
        tokens_before_parting(tokens, *expected[key], ("mixed", key))
    assert any(chunk_slots)  # adapters' chunks did go through mixed passes


def test_scored_prompts_use_the_rows_as_peft(engine: Engine, peft_model: Any) -> None:
    """Prompt scoring (every position's logits, the tied head's columns of the adapter's
    tokens among them) of token adapters beside the base in one batch: each prompt token's
    logprob as PEFT's, within the logprob tests' tolerance (4% of the position's logit
    range, tests/test_logprobs.py). tokens-lora is in the batch but not compared: its
    all-linear LoRA on the bf16 copy (rounded once) against the served 4-bit path (the delta
    rounded first) parted by 4.6% of the range at the position after its 4x-spread
    <|im_end|> row (measured; its greedy tokens match above); the rows themselves are
    tokens-only's, whose LoRA is negligible."""
    prompt = engine.render_chat([("user", PROMPTS[0])])
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    names = ("tokens-only", "tokens-lora", None)
    streams = {
        name: engine.submit(GenerationRequest(f"scored-{name}", prompt, params, name))
        for name in names
    }
    scores = {
        name: [s for e in stream for s in e.prompt_logprobs] for name, stream in streams.items()
    }
    for name in ("tokens-only", None):
        with torch.inference_mode():
            if name is None:
                with peft_model.disable_adapter():
                    logits = peft_model(input_ids=torch.tensor([prompt])).logits[0].float()
            else:
                peft_model.set_adapter(name)
                logits = peft_model(input_ids=torch.tensor([prompt])).logits[0].float()
        reference = torch.log_softmax(logits, dim=-1)
        assert len(scores[name]) == len(prompt) and scores[name][0] is None
        for q in range(1, len(prompt)):
            scored = scores[name][q]
            assert scored is not None and scored.token_id == prompt[q]
            span = float(logits[q - 1].max() - logits[q - 1].min())
            error = abs(scored.logprob - float(reference[q - 1, prompt[q]])) / span
            assert error <= 0.04, (name, q, scored.logprob, float(reference[q - 1, prompt[q]]))
    # the rows change the scores: <|im_end|> and " France" are scored with tokens-only's rows
    assert scores["tokens-only"] != scores[None]


def test_token_rows_do_not_reach_other_rows_or_the_prefix_cache(engine: Engine) -> None:
    """The base rows of a batch beside a token adapter's are the base model's alone, and a
    prefix computed under the token rows is not reused for the base (nor the reverse)."""
    # Tokens no other request of this module starts with (a chat-rendered prompt would share
    # the template's first blocks with them), several blocks, holding the adapter's ids.
    ids = _token_ids_of(engine)
    prompt = [ids[0], *engine.tokenize(" Name three rivers of France." * 6), ids[1]]

    def run(adapter: str | None, tag: str) -> list[int]:
        request = GenerationRequest(
            f"{tag}-{adapter}", prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), adapter
        )
        return [t for e in engine.submit(request) for t in e.token_ids]

    base_alone = run(None, "first")
    hits = engine.stats().prefix_hit_tokens
    with_rows = run("tokens-only", "second")
    assert engine.stats().prefix_hit_tokens == hits  # the base's blocks were not reused
    assert with_rows != base_alone
    assert run(None, "third") == base_alone


def _token_ids_of(engine: Engine) -> list[int]:
    """<|im_start|> and " France": tokens-only's rows."""
    return [engine.tokenize("<|im_start|>")[0], engine.tokenize(" France")[0]]


def test_token_rows_memory_is_counted(engine: Engine) -> None:
    """A resident adapter's token rows (ids and bf16 rows) are in the device bytes."""
    for name in ("tokens-lora", "tokens-only", "plain", "dora", "tokens-dora"):
        engine.adapters.unload(name)
    engine.adapters.load("plain")  # rank 8, as tokens-lora
    one_slot = engine.adapters.memory()["device_used_bytes"]
    engine.adapters.load("tokens-lora")
    both = engine.adapters.memory()["device_used_bytes"]
    assert both - 2 * one_slot == 3 * (8 + 2 * HIDDEN)  # int64 id + bf16 row, 3 tokens


def test_token_adapters_are_not_composed(engine: Engine) -> None:
    """PEFT defines no weighted sum of replaced rows: refused naming the entry."""
    with pytest.raises(InvalidArgument, match="trainable tokens") as info:
        engine.adapters.weighted([WeightedAdapter("plain", 1.0), WeightedAdapter("tokens-only", 1)])
    assert info.value.field == "adapters[1].name"
    assert engine.adapters.weighted([WeightedAdapter("tokens-only", 1.0)]) == "tokens-only"


def _edit(folder: Path, target: Path, change: Any, config: dict[str, Any] | None = None) -> Path:
    target.mkdir()
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(target / WEIGHTS_FILE), metadata={"format": "pt"})
    written = json.loads((folder / CONFIG_FILE).read_text())
    written.update(config or {})
    (target / CONFIG_FILE).write_text(json.dumps(written))
    return target


def _set(value: torch.Tensor) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[KEY] = value

    return change


def _poison(value: float) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[KEY] = tensors[KEY].clone()
        tensors[KEY][1, 7] = value

    return change


def _drop(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[KEY]


def _same(tensors: dict[str, torch.Tensor]) -> None:
    pass


def _rename(tensors: dict[str, torch.Tensor]) -> None:
    tensors[KEY.replace("model.embed_tokens", "lm_head")] = tensors.pop(KEY)


@pytest.mark.parametrize(
    ("case", "change", "config", "error", "field", "message"),
    [
        ("outside", _same, {"trainable_token_indices": [2, VOCAB, 5]}, InvalidArgument,
         "trainable_token_indices", r"token id 49152 is outside .* vocabulary of 49152"),
        ("negative", _same, {"trainable_token_indices": [2, -1, 5]}, InvalidArgument,
         "trainable_token_indices", r"non-negative integers"),
        ("twice", _same, {"trainable_token_indices": [2, 2, 5]}, InvalidArgument,
         "trainable_token_indices", r"twice"),
        ("too-many", _same, {"trainable_token_indices": list(range(9))}, FailedPrecondition,
         "trainable_token_indices", r"9 token rows, above this server's max_trainable_tokens"),
        ("rows", _set(torch.ones(2, HIDDEN)), None, InvalidArgument, WEIGHTS_FILE,
         r"delta: shape \[2, 576\], expected \[3, 576\]"),
        ("width", _set(torch.ones(3, 64)), None, InvalidArgument, WEIGHTS_FILE,
         r"delta: shape \[3, 64\]"),
        ("int", _set(torch.ones(3, HIDDEN, dtype=torch.int32)), None, InvalidArgument,
         WEIGHTS_FILE, r"delta: dtype I32 is not a float"),
        ("nan", _poison(float("nan")), None, InvalidArgument, WEIGHTS_FILE,
         r"delta holds NaN or Inf"),
        ("inf", _poison(float("-inf")), None, InvalidArgument, WEIGHTS_FILE,
         r"delta holds NaN or Inf"),
        ("huge", _poison(1e30), None, InvalidArgument, WEIGHTS_FILE, r"delta holds values up to"),
        ("missing", _drop, None, InvalidArgument, WEIGHTS_FILE, r"delta is missing"),
        ("no-config", _same, {"trainable_token_indices": None}, InvalidArgument,
         "trainable_token_indices", r"sets no trainable_token_indices"),
        ("lm-head", _same, {"trainable_token_indices": {"lm_head": [1, 2, 3]}}, InvalidArgument,
         "trainable_token_indices", r"'lm_head' is not the input embedding"),
        ("other-key", _rename, None, InvalidArgument, WEIGHTS_FILE,
         r"lm_head\.token_adapter.*only .*embed_tokens"),
        ("whole", _same, {"modules_to_save": ["embed_tokens"]}, InvalidArgument,
         "modules_to_save", r"use trainable_token_indices"),
    ],
)  # fmt: skip
def test_bad_token_files_are_refused_naming_the_field(
    adapter_dirs: dict[str, Path],
    smollm2: ResolvedModel,
    tmp_path: Path,
    case: str,
    change: Any,
    config: dict[str, Any] | None,
    error: type[LoramuxError],
    field: str,
    message: str,
) -> None:
    """What upload runs (`inspect_adapter` with the weights read, as the store's validate):
    refused naming the tensor or field, before the adapter is stored."""
    folder = _edit(adapter_dirs["tokens-lora"], tmp_path / case, change, config)
    with pytest.raises(error, match=message) as info:
        inspect_adapter(folder, linear_shapes(smollm2.path), 64, embedding=EMBEDDING)
    assert info.value.field == field


def test_upload_validation_uses_the_engine_embedding_and_cap(
    engine: Engine, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """What the upload RPC runs (`AdapterStore.validate`): the engine's own vocabulary and
    --max-trainable-tokens (here the default, 64)."""
    spec = engine.adapters.validate(adapter_dirs["tokens-lora"])
    assert spec.trainable_tokens == 3
    for case, ids, error, message in (
        ("outside", [1, VOCAB], InvalidArgument, "outside the base model's vocabulary"),
        ("too-many", list(range(65)), FailedPrecondition, "above this server's max_trainable"),
    ):
        rows = torch.zeros(len(ids), HIDDEN)
        folder = _edit(
            adapter_dirs["tokens-lora"],
            tmp_path / case,
            _set(rows),
            {"trainable_token_indices": ids},
        )
        with pytest.raises(error, match=message) as info:
            engine.adapters.validate(folder)
        assert info.value.field == "trainable_token_indices"


def test_a_server_without_token_rows_refuses_them(
    adapter_dirs: dict[str, Path], smollm2: ResolvedModel
) -> None:
    linears = linear_shapes(smollm2.path)
    for embedding in (None, EmbeddingShape("model.embed_tokens", VOCAB, HIDDEN, 0)):
        with pytest.raises(FailedPrecondition, match="max_trainable_tokens is 0") as info:
            inspect_adapter(adapter_dirs["tokens-lora"], linears, 64, embedding=embedding)
        assert info.value.field == "trainable_token_indices"
    loaded = inspect_adapter(adapter_dirs["tokens-lora"], linears, 64, embedding=EMBEDDING)
    assert loaded.tokens is not None and loaded.spec.trainable_tokens == 3
    assert loaded.tokens.ids.tolist() == sorted(loaded.tokens.ids.tolist())


def test_max_trainable_tokens_is_validated() -> None:
    with pytest.raises(ValueError, match="--max-trainable-tokens must be >= 0"):
        Settings(max_trainable_tokens=-1).validate()
    Settings(max_trainable_tokens=0).validate()
