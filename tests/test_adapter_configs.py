"""Issue 11.1: adapter_config.json is read the way PEFT reads it, or refused naming the field.

Parser-level cases on the tiny random Llama (what PEFT 0.21 would wrap is worked out from
its own matching rules, restated in each test); the greedy comparisons with PEFT itself on
the real NF4 SmolLM2 are in test_adapter_configs_peft.py.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.core.errors import FailedPrecondition, InvalidArgument, LoramuxError
from loramux.core.models import ResolvedModel
from loramux.server.adapters import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, LinearShape
from loramux.server.adapters import inspect_adapter as _inspect
from loramux.server.lora import base_linear_shapes
from loramux.server.synthetic import write_random_adapter

Linears = dict[str, LinearShape]


@pytest.fixture(scope="module")
def model_modules(tiny_llama: ResolvedModel) -> tuple[Linears, list[str]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama.path))
    return base_linear_shapes(model), [name for name, _ in model.named_modules()]


@pytest.fixture(scope="module")
def linears(model_modules: tuple[Linears, list[str]]) -> Linears:
    return model_modules[0]


def inspect(folder: Path, model_modules: tuple[Linears, list[str]], max_rank: int = 64):  # type: ignore[no-untyped-def]
    linears, names = model_modules
    return _inspect(folder, linears, max_rank, module_names=names)


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / CONFIG_FILE).write_text(json.dumps(config))


DROP = object()


def keep_weights(folder: Path, keep: object) -> None:
    """Drop every module's A/B pair for which `keep(module name)` is false."""
    tensors = load_file(str(folder / WEIGHTS_FILE))
    kept = {}
    for key, tensor in tensors.items():
        module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
        if keep(module):  # type: ignore[operator]
            kept[key] = tensor
    save_file(kept, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def write_ranked(folder: Path, linears: Linears, ranks: dict[str, int], **config: object) -> Path:
    """An adapter whose module `name` has rank `ranks[name]` (modules not listed: none)."""
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, rank in ranks.items():
        shape = linears[name]
        a = torch.randn(rank, shape.in_features, generator=generator) * 0.05
        b = torch.randn(shape.out_features, rank, generator=generator) * 0.05
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.bfloat16()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.bfloat16()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    full = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **config}
    (folder / CONFIG_FILE).write_text(json.dumps(full))
    return folder


@pytest.fixture
def adapter(tmp_path: Path, linears: Linears) -> Path:
    return write_random_adapter(tmp_path / "ok", linears, rank=4, alpha=16)


def refused(folder: Path, modules: tuple[Linears, list[str]]) -> LoramuxError:
    with pytest.raises((InvalidArgument, FailedPrecondition)) as info:
        inspect(folder, modules)
    return info.value


# ---- defaults and fields applied as PEFT applies them ----------------------------------


def test_missing_lora_alpha_means_8_as_in_peft(adapter: Path, model_modules) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    edit_config(adapter, lora_alpha=DROP)
    weights = inspect(adapter, model_modules)
    assert LoraConfig().lora_alpha == 8  # the default being mirrored
    assert {m.scaling for m in weights.modules.values()} == {8 / 4}
    assert weights.spec.alpha == 8 and weights.spec.scaling == 2.0


def test_missing_r_means_8(tmp_path: Path, linears: Linears, model_modules) -> None:  # type: ignore[no-untyped-def]
    folder = write_random_adapter(tmp_path / "r8", linears, rank=8, alpha=16)
    edit_config(folder, r=DROP)
    assert inspect(folder, model_modules).spec.rank == 8


def test_fan_in_fan_out_is_ignored_on_linear_layers_like_peft(adapter: Path, model_modules) -> None:  # type: ignore[no-untyped-def]
    """PEFT warns and sets fan_in_fan_out=False for torch.nn.Linear (and bnb's 4-bit) targets."""
    edit_config(adapter, fan_in_fan_out=True)
    assert inspect(adapter, model_modules).spec.modules == 14


def test_rank_and_alpha_patterns_first_matching_key_wins(
    tmp_path: Path, linears: Linears, model_modules
) -> None:  # type: ignore[no-untyped-def]
    names = list(linears)
    ranks = {name: 4 for name in names}
    ranks["model.layers.1.self_attn.q_proj"] = 8  # the full-path key, listed first
    for name in names:
        if name.endswith("v_proj"):
            ranks[name] = 2
    folder = write_ranked(
        tmp_path / "pat",
        linears,
        ranks,
        r=4,
        lora_alpha=8,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        # PEFT: the first key (in file order) for which re.match(rf"(.*\.)?({key})$", name)
        rank_pattern={"model.layers.1.self_attn.q_proj": 8, "q_proj": 4, "v_proj": 2},
        alpha_pattern={
            "layers.0.mlp.down_proj": 2,
            "self_attn.q_proj": 32,
            "down_proj": 64,
            "q_proj": 1,
        },
    )
    weights = inspect(folder, model_modules)
    scaling = {name: m.scaling for name, m in weights.modules.items()}
    assert scaling["model.layers.1.self_attn.q_proj"] == 32 / 8
    assert scaling["model.layers.0.self_attn.q_proj"] == 32 / 4
    assert scaling["model.layers.0.self_attn.v_proj"] == 8 / 2
    assert scaling["model.layers.0.mlp.down_proj"] == 2 / 4  # the first key that matches
    assert scaling["model.layers.1.mlp.down_proj"] == 64 / 4
    # A key must match a whole name segment from the end: "proj" does not match "gate_proj".
    folder2 = write_ranked(
        tmp_path / "seg",
        linears,
        dict.fromkeys(names, 4),
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        alpha_pattern={"proj": 32},
    )
    assert {m.scaling for m in inspect(folder2, model_modules).modules.values()} == {2.0}


def test_target_modules_regex_string_and_all_linear(
    tmp_path: Path, linears: Linears, model_modules
) -> None:  # type: ignore[no-untyped-def]
    qv = {n: 4 for n in linears if n.endswith(("q_proj", "v_proj"))}
    folder = write_ranked(tmp_path / "re", linears, qv, r=4, target_modules=r".*\.(q_proj|v_proj)")
    assert set(inspect(folder, model_modules).modules) == set(qv)
    # re.fullmatch: ".*q_proj" does not match "...v_proj", and "q_proj" alone matches nothing.
    folder = write_ranked(tmp_path / "full", linears, qv, r=4, target_modules="q_proj")
    assert refused(folder, model_modules).field == "target_modules"
    folder = write_ranked(
        tmp_path / "all", linears, dict.fromkeys(linears, 4), r=4, target_modules="ALL-LINEAR"
    )
    assert inspect(folder, model_modules).spec.modules == len(linears)


def test_exclude_modules_and_layers_to_transform_narrow_the_targets(
    tmp_path: Path, linears: Linears, model_modules
) -> None:  # type: ignore[no-untyped-def]
    q = {n: 4 for n in linears if n.endswith("q_proj")}
    assert len(q) == 2
    kept = {n: r for n, r in q.items() if ".1." in n}
    folder = write_ranked(
        tmp_path / "ex",
        linears,
        kept,
        r=4,
        target_modules=["q_proj"],
        exclude_modules=["layers.0.self_attn.q_proj"],
    )
    assert set(inspect(folder, model_modules).modules) == set(kept)
    folder = write_ranked(
        tmp_path / "exre", linears, kept, r=4, target_modules=["q_proj"], exclude_modules=r".*0.*"
    )
    assert set(inspect(folder, model_modules).modules) == set(kept)
    for pattern in (None, "layers", ["blocks", "layers"]):
        folder = write_ranked(
            tmp_path / f"ltt{pattern!s}",
            linears,
            kept,
            r=4,
            target_modules=["q_proj"],
            layers_to_transform=[1],
            layers_pattern=pattern,
        )
        assert set(inspect(folder, model_modules).modules) == set(kept)
    folder = write_ranked(
        tmp_path / "lttint", linears, kept, r=4, target_modules=["q_proj"], layers_to_transform=1
    )
    assert set(inspect(folder, model_modules).modules) == set(kept)


def test_converted_pissa_adapter_is_plain_lora(
    tmp_path: Path, tiny_llama: ResolvedModel, model_modules
) -> None:  # type: ignore[no-untyped-def]
    """What PEFT writes for a PiSSA adapter saved with path_initial_model_for_weight_conversion:
    init_lora_weights true, r and alpha doubled, A/B the difference from the initial ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama.path), dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(str(tmp_path / "init"))
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.01)
    peft_model.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    saved = json.loads((tmp_path / "converted" / CONFIG_FILE).read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    weights = inspect(tmp_path / "converted", model_modules)
    assert weights.spec.rank == 8 and weights.spec.scaling == 16 / 8
    # ...while the unconverted one is refused, saying how to convert it.
    peft_model.save_pretrained(str(tmp_path / "raw"))
    error = refused(tmp_path / "raw", model_modules)
    assert error.field == "init_lora_weights"
    assert "path_initial_model_for_weight_conversion" in str(error)


# ---- refused, naming the field ---------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights", "path_initial_model_for_weight"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights", "path_initial_model"),
        ({"init_lora_weights": "olora"}, "init_lora_weights", "path_initial_model"),
        ({"init_lora_weights": "corda"}, "init_lora_weights", "path_initial_model"),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights", "path_initial_model"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights", "replace_lora_weights_loftq"),
        ({"init_lora_weights": "mica"}, "init_lora_weights", "init_lora_weights"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens", "activated LoRA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication", "layer"),
        ({"lora_bias": True}, "lora_bias", "bias"),
        ({"bias": "lora_only"}, "bias", "bias"),
        ({"use_dora": True}, WEIGHTS_FILE, "lora_magnitude_vector is missing"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save", "use trainable_token_indices"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices", "token"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters", "parameter"),
        ({"use_qalora": True}, "use_qalora", "QA-LoRA"),
        ({"use_bdlora": {"nblocks": 2}}, "use_bdlora", "not supported"),
        ({"arrow_config": {"top_k": 2}}, "arrow_config", "not supported"),
        ({"kasa_config": {}}, "kasa_config", "not supported"),
        ({"megatron_config": {"a": 1}}, "megatron_config", "Megatron"),
        ({"task_type": "SEQ_CLS"}, "task_type", "CAUSAL_LM"),
        ({"peft_type": "IA3"}, "peft_type", "LORA"),
        ({"peft_type": DROP}, "peft_type", "missing"),
        ({"target_modules": DROP}, "target_modules", "target_modules"),
        ({"target_modules": []}, "target_modules", "no module"),
        ({"target_modules": ["c_attn"]}, "target_modules", "no module"),
        ({"target_modules": [3]}, "target_modules", "string"),
        ({"target_modules": ["q_proj", "input_layernorm"]}, "target_modules", "not a linear"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules", "embed_tokens"),
        ({"r": 4.5}, "r", "integer"),
        ({"r": True}, "r", "integer"),
        ({"lora_alpha": "16"}, "lora_alpha", "number"),
        ({"use_rslora": "yes"}, "use_rslora", "true or false"),
        ({"rank_pattern": {"q_proj": 4.5}}, "rank_pattern", "integer"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern", "object"),
        ({"alpha_pattern": {"(q_proj": 4}}, "alpha_pattern", "regular expression"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform", "integer"),
        ({"layers_pattern": "layers"}, "layers_pattern", "layers_to_transform"),
        ({"exclude_modules": 5}, "exclude_modules", "string"),
        ({"some_future_option": {"on": True}}, "some_future_option", "PEFT 0.22"),
    ],
)
def test_unsupported_or_malformed_fields_are_refused(
    adapter: Path, model_modules, changes: dict[str, object], field: str, reason: str
) -> None:  # type: ignore[no-untyped-def]
    edit_config(adapter, **changes)
    error = refused(adapter, model_modules)
    assert error.field == field, str(error)
    assert reason in str(error), str(error)


def test_inert_unknown_keys_are_ignored(adapter: Path, model_modules) -> None:  # type: ignore[no-untyped-def]
    """Keys an older or newer PEFT wrote, left unset, change nothing (PEFT drops them too)."""
    edit_config(adapter, enable_lora=None, merge_weights=False, future_list=[], runtime_config={})
    assert inspect(adapter, model_modules).spec.rank == 4


def test_layers_to_transform_with_a_regex_target_is_refused(
    tmp_path: Path, linears: Linears, model_modules
) -> None:  # type: ignore[no-untyped-def]
    q = {n: 4 for n in linears if n.endswith("q_proj")}
    folder = write_ranked(
        tmp_path / "a", linears, q, r=4, target_modules=".*q_proj", layers_to_transform=[0]
    )
    assert refused(folder, model_modules).field == "layers_to_transform"


# ---- weights PEFT would not load -----------------------------------------------------------


def test_weights_outside_target_modules_are_refused(adapter: Path, model_modules) -> None:  # type: ignore[no-untyped-def]
    edit_config(adapter, target_modules=["q_proj", "v_proj"])  # the file holds all seven
    error = refused(adapter, model_modules)
    assert error.field == "target_modules"
    assert "k_proj" in str(error) and "would not" in str(error)


def test_weights_in_exclude_modules_are_refused(adapter: Path, model_modules) -> None:  # type: ignore[no-untyped-def]
    edit_config(adapter, exclude_modules=["layers.0.mlp.up_proj"])
    error = refused(adapter, model_modules)
    assert error.field == "exclude_modules" and "model.layers.0.mlp.up_proj" in str(error)


def test_weights_outside_layers_to_transform_are_refused(adapter: Path, model_modules) -> None:  # type: ignore[no-untyped-def]
    edit_config(adapter, layers_to_transform=[0])
    error = refused(adapter, model_modules)
    assert error.field == "layers_to_transform" and "model.layers.1." in str(error)


def test_targeted_module_without_weights_is_refused(adapter: Path, model_modules) -> None:  # type: ignore[no-untyped-def]
    """PEFT would wrap it with freshly initialised (for init_lora_weights=false: random) A/B."""
    keep_weights(adapter, lambda name: name != "model.layers.1.mlp.up_proj")
    error = refused(adapter, model_modules)
    assert error.field == WEIGHTS_FILE and "model.layers.1.mlp.up_proj" in str(error)


# ---- tenant-written patterns are matched in bounded time ---------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank_pattern", {"(.|.)*y": 4}),
        ("alpha_pattern", {"(.|.|.)*y": 4}),
        ("target_modules", "(.|.)*(x|y)+z"),
        ("exclude_modules", r"(\w|.)*#"),
        ("layers_pattern", "(.|.)*y"),
    ],
)
def test_catastrophic_patterns_are_refused_in_bounded_time(
    adapter: Path, model_modules, field: str, value: object
) -> None:  # type: ignore[no-untyped-def]
    if field == "layers_pattern":
        edit_config(adapter, layers_to_transform=[0, 1], layers_pattern=value)
    else:
        edit_config(adapter, **{field: value})
    # The interpreter stays free while it is checked: another thread keeps running.
    ticks = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            stop.wait(0.05)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        error = refused(adapter, model_modules)
    finally:
        stop.set()
        ticker.join()
    assert error.field == field, str(error)
    assert "too long" in str(error)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) >= 5 and max(gaps) < 0.5, gaps


def _rename_tensors(folder: Path, rename: object) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    renamed = {rename(k): v for k, v in tensors.items()}  # type: ignore[operator]
    save_file(renamed, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def test_tensor_names_peft_would_not_load_are_refused(adapter: Path, model_modules) -> None:  # type: ignore[no-untyped-def]
    """PeftModel.from_pretrained loads `base_model.model.<module>.lora_A.weight` (and the same
    with `.default.`); without the prefix, or with another adapter name in the key, it warns
    of missing keys and leaves those layers as initialised: the server must not apply them."""
    original = load_file(str(adapter / WEIGHTS_FILE))
    _rename_tensors(adapter, lambda k: k.removeprefix(PEFT_PREFIX))
    error = refused(adapter, model_modules)
    assert error.field == WEIGHTS_FILE and PEFT_PREFIX in str(error)
    save_file(original, str(adapter / WEIGHTS_FILE), metadata={"format": "pt"})
    _rename_tensors(
        adapter,
        lambda k: k.replace(".lora_A.", ".lora_A.other.").replace(".lora_B.", ".lora_B.other."),
    )
    error = refused(adapter, model_modules)
    assert error.field == WEIGHTS_FILE and "'other'" in str(error)
    save_file(original, str(adapter / WEIGHTS_FILE), metadata={"format": "pt"})
    _rename_tensors(
        adapter,
        lambda k: k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."),
    )
    assert inspect(adapter, model_modules).spec.modules == 14
