"""Adapter files are checked before use; every refusal names its field (issues 3 and 7)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loramux.core.errors import FailedPrecondition, InvalidArgument
from loramux.core.models import ResolvedModel
from loramux.server.adapters import CONFIG_FILE, WEIGHTS_FILE, LinearShape, inspect_adapter
from loramux.server.lora import base_linear_shapes
from loramux.server.synthetic import write_random_adapter


@pytest.fixture(scope="module")
def linears(tiny_llama: ResolvedModel) -> dict[str, LinearShape]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama.path))
    return base_linear_shapes(model)


@pytest.fixture
def adapter(tmp_path: Path, linears: dict[str, LinearShape]) -> Path:
    return write_random_adapter(tmp_path / "ok", linears, rank=8, alpha=16)


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _check(folder: Path, linears: dict[str, LinearShape], max_rank: int = 64) -> None:
    inspect_adapter(folder, linears, max_rank)


def test_valid_adapter_is_read(adapter: Path, linears: dict[str, LinearShape]) -> None:
    weights = inspect_adapter(adapter, linears, 64)
    assert weights.spec.rank == 8
    assert weights.spec.scaling == 2.0
    assert set(weights.spec.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    module = next(iter(weights.modules.values()))
    assert module.lora_a.dtype == torch.bfloat16 and module.lora_a.shape[0] == 8
    # B as the slots hold it (B^T, [rank, out]) is one contiguous block: a plain copy.
    assert module.lora_b.shape[1] == 8 and module.lora_b.t().is_contiguous()


def test_rslora_and_patterns_set_scaling(tmp_path: Path, linears: dict[str, LinearShape]) -> None:
    folder = write_random_adapter(tmp_path / "rs", linears, rank=16, alpha=8, use_rslora=True)
    weights = inspect_adapter(folder, linears, 64)
    assert all(m.scaling == pytest.approx(8 / 4) for m in weights.modules.values())
    folder = write_random_adapter(tmp_path / "pat", linears, rank=4, alpha=4)
    _edit_config(folder, alpha_pattern={"q_proj": 16})
    weights = inspect_adapter(folder, linears, 64)
    scalings = {name.rsplit(".", 1)[-1]: m.scaling for name, m in weights.modules.items()}
    assert scalings["q_proj"] == 4.0 and scalings["k_proj"] == 1.0


def test_pickle_only_is_refused_without_unpickling(
    adapter: Path, linears: dict[str, LinearShape]
) -> None:
    (adapter / WEIGHTS_FILE).unlink()
    # A pickle that would run code if loaded: it must never be opened.
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(InvalidArgument, match="pickle") as info:
        _check(adapter, linears)
    assert info.value.field == WEIGHTS_FILE
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"use_dora": True}, WEIGHTS_FILE),  # no magnitude vectors in the file
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"bias": "all"}, "bias"),
        ({"r": -1}, "r"),
        ({"r": 4}, "r"),  # disagrees with the weights' rank
    ],
)
def test_unsupported_config_is_refused(
    adapter: Path, linears: dict[str, LinearShape], changes: dict[str, object], field: str
) -> None:
    _edit_config(adapter, **changes)
    with pytest.raises(InvalidArgument) as info:
        _check(adapter, linears)
    assert info.value.field == field


def test_missing_or_invalid_config(adapter: Path, linears: dict[str, LinearShape]) -> None:
    (adapter / CONFIG_FILE).write_text("{not json")
    with pytest.raises(InvalidArgument, match="JSON") as info:
        _check(adapter, linears)
    assert info.value.field == CONFIG_FILE
    (adapter / CONFIG_FILE).unlink()
    with pytest.raises(InvalidArgument, match="missing"):
        _check(adapter, linears)


def test_rank_above_limit_is_a_failed_precondition(
    adapter: Path, linears: dict[str, LinearShape]
) -> None:
    with pytest.raises(FailedPrecondition, match="max_rank") as info:
        _check(adapter, linears, max_rank=4)
    assert info.value.field == "r"


def test_shapes_from_another_base_are_refused(
    tmp_path: Path, linears: dict[str, LinearShape]
) -> None:
    wider = {name: LinearShape(s.in_features * 2, s.out_features) for name, s in linears.items()}
    folder = write_random_adapter(tmp_path / "wide", wider, rank=4)
    with pytest.raises(FailedPrecondition, match="another base model"):
        _check(folder, linears)


def test_unknown_modules_and_heads_are_refused(
    tmp_path: Path, linears: dict[str, LinearShape]
) -> None:
    other_arch = {"transformer.h.0.attn.c_attn": LinearShape(64, 192)}
    folder = write_random_adapter(tmp_path / "gpt2", other_arch, rank=4)
    with pytest.raises(FailedPrecondition, match="another architecture") as info:
        _check(folder, linears)
    assert info.value.field == "target_modules"
    head = {"lm_head": LinearShape(64, 100)}
    folder = write_random_adapter(tmp_path / "head", head, rank=4)
    with pytest.raises(FailedPrecondition, match="lm_head"):
        _check(folder, linears)


def test_embedding_lora_is_refused(adapter: Path, linears: dict[str, LinearShape]) -> None:
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 10)
    save_file(tensors, str(adapter / WEIGHTS_FILE))
    with pytest.raises(FailedPrecondition, match="embeddings"):
        _check(adapter, linears)


def test_nan_weights_are_refused(adapter: Path, linears: dict[str, LinearShape]) -> None:
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(adapter / WEIGHTS_FILE))
    with pytest.raises(InvalidArgument, match="NaN"):
        _check(adapter, linears)


def test_truncated_and_lying_headers(adapter: Path, linears: dict[str, LinearShape]) -> None:
    path = adapter / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArgument, match=r"truncated|corrupt"):
        _check(adapter, linears)
    path.write_bytes(data[:5])
    with pytest.raises(InvalidArgument, match="truncated"):
        _check(adapter, linears)
    # A header that claims a 4 TB tensor in a tiny file.
    header = json.dumps(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
                "dtype": "F32",
                "shape": [1 << 20, 1 << 20],
                "data_offsets": [0, 4 << 40],
            }
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(InvalidArgument, match="header claims"):
        _check(adapter, linears)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InvalidArgument, match="header length"):
        _check(adapter, linears)


# ---- the header parser, fuzzed (issue 11.5: no crafted header gives INTERNAL) -------------

_BIG = ["1e400", "-1e400", "1" + "0" * 5000, "-0", "1e-400", "NaN", "Infinity"]
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from([f"__BIG{i}__" for i in range(len(_BIG))]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_plausible = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "BOOL", "X9"]) | _json_values,
        "shape": st.lists(st.integers(min_value=-2, max_value=1 << 40), max_size=3) | _json_values,
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=1 << 40), max_size=3)
        | _json_values,
    }
)
_KEYS = [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    "__metadata__",
    "junk",
]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.dictionaries(st.sampled_from(_KEYS), _plausible | _json_values, max_size=3)
    | _json_values,
    body=st.binary(max_size=128),
)
def test_fuzzed_headers_never_fail_with_anything_but_a_named_refusal(
    adapter: Path, linears: dict[str, LinearShape], header: object, body: bytes
) -> None:
    raw = json.dumps(header)
    for i, literal in enumerate(_BIG):
        raw = raw.replace(f'"__BIG{i}__"', literal)
    data = raw.encode()
    (adapter / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(data)) + data + body)
    try:
        _check(adapter, linears)
    except (InvalidArgument, FailedPrecondition) as exc:
        assert exc.field  # named: never an unnamed INTERNAL


def test_header_over_the_limit_is_refused_before_parsing(
    adapter: Path, linears: dict[str, LinearShape]
) -> None:
    """json.loads holds the GIL: a 68 MiB header stalled every thread ~10 s; 2 MiB is the cap."""
    entries = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [0],
            "data_offsets": [0, 0],
        }
        for i in range(30_000)
    }
    raw = json.dumps(entries).encode()
    assert len(raw) > 2 << 20
    (adapter / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(InvalidArgument, match="over the 2 MiB limit"):
        _check(adapter, linears)
