"""Issue 2: layout, configuration, base-model resolution, the default model answers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loramux.cli import build_parser
from loramux.core.config import Settings, load_settings
from loramux.core.errors import InvalidArgument, NotFound
from loramux.core.models import (
    BUILTIN_MODELS,
    PREPARED_MARKER,
    ResolvedModel,
    list_prepared,
    load_base_model,
    load_tokenizer,
    resolve_base_model,
)

REPO = Path(__file__).resolve().parents[1]


def test_settings_precedence_flag_over_env_over_default() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--max-batch-size", "7"])
    env = {"LORAMUX_MAX_BATCH_SIZE": "9", "LORAMUX_PORT": "6000", "LORAMUX_ADMIN_KEYS": "a, b"}
    settings = load_settings(args, env)
    assert settings.max_batch_size == 7  # flag wins
    assert settings.port == 6000  # env var next
    assert settings.admin_keys == ["a", "b"]
    assert settings.max_rank == Settings().max_rank  # default last


def test_a_switch_that_is_on_by_default_can_be_turned_off_by_flag() -> None:
    """`--no-prefix-caching` wins over the env var, as every flag does; `--prefix-caching`
    turns it back on over an env var that says off."""
    parser = build_parser()
    on_by_env = {"LORAMUX_PREFIX_CACHING": "1"}
    assert load_settings(parser.parse_args(["serve"]), {}).prefix_caching is True
    off = load_settings(parser.parse_args(["serve", "--no-prefix-caching"]), on_by_env)
    assert off.prefix_caching is False
    on = load_settings(
        parser.parse_args(["serve", "--prefix-caching"]), {"LORAMUX_PREFIX_CACHING": "0"}
    )
    assert on.prefix_caching is True
    assert (
        load_settings(parser.parse_args(["serve", "--no-dev"]), {"LORAMUX_DEV": "1"}).dev is False
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LORAMUX_MAX_BATCH_SIZE": "0"}, "--max-batch-size"),
        ({"LORAMUX_QUANTIZATION": "int3"}, "--quantization"),
        ({"LORAMUX_PORT": "70000"}, "--port"),
        ({"LORAMUX_MAX_RANK": "sixteen"}, "max_rank"),
        ({"LORAMUX_MAX_PREFILL_TOKENS_WHILE_DECODING": "-1"}, "--max-prefill-tokens-while"),
        ({"LORAMUX_MAX_PREFILL_ATTENTION_WHILE_DECODING": "-5"}, "--max-prefill-attention-while"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(None, env)


def _all_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags: set[str] = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _all_flags(sub)
    return flags


def test_every_setting_has_a_flag() -> None:
    flags = _all_flags(build_parser())
    missing = [
        f.name for f in dataclasses.fields(Settings) if f"--{f.name.replace('_', '-')}" not in flags
    ]
    assert not missing


def test_cli_help_for_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("serve", "train", "generate", "adapters", "models"):
        assert command in out
        result = subprocess.run(
            [sys.executable, "-m", "loramux.cli", command, "--help"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert "usage: loramux " + command in result.stdout


def test_resolve_rejects_bad_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="base_model"):
        resolve_base_model("", tmp_path)
    with pytest.raises(NotFound, match="base_model"):
        resolve_base_model("./no/such/folder", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgument, match=r"config\.json"):
        resolve_base_model(str(empty), tmp_path)


def test_hub_id_resolves_offline_from_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HF_HUB_OFFLINE=1 and an empty cache a Hub id is a clear NotFound, not a hang."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from loramux.core.models import resolve_base_model\n"
        "from loramux.core.errors import NotFound\n"
        "import pathlib\n"
        "try:\n"
        "    resolve_base_model('someone/some-model', pathlib.Path('x'))\n"
        "except NotFound as e:\n"
        "    print('NOTFOUND', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "NOTFOUND base_model" in out.stdout, out.stderr


def test_local_folder_and_hub_cache_resolution(tiny_llama: ResolvedModel, tmp_path: Path) -> None:
    resolved = resolve_base_model(str(tiny_llama.path), tmp_path)
    assert resolved.path == tiny_llama.path.resolve()
    # A Hub id served from a populated cache, with the network switched off.
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_llama.path.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    code = (
        "from loramux.core.models import resolve_base_model\n"
        "import pathlib\n"
        "r = resolve_base_model('acme/tiny', pathlib.Path('x'))\n"
        "print('PATH', r.path, r.revision, r.reference)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert f"PATH {snapshot} {'a' * 40} acme/tiny" in out.stdout, out.stderr
    assert constants.HF_HUB_OFFLINE in (True, False)


def test_prepared_model_is_listed_and_marked(smollm2: ResolvedModel) -> None:
    assert (smollm2.path / PREPARED_MARKER).is_file()
    assert (smollm2.path / "model.safetensors").is_file()
    assert (smollm2.path / "chat_template.jinja").is_file() or "chat_template" in (
        smollm2.path / "tokenizer_config.json"
    ).read_text()
    names = [m["name"] for m in list_prepared(smollm2.path.parent)]
    assert "smollm2-135m-instruct" in names
    assert smollm2.reference == "smollm2-135m-instruct"
    assert BUILTIN_MODELS["smollm2-135m-instruct"].hub_id == smollm2.hub_id


@pytest.mark.slow
def test_concurrent_prepare_is_atomic(tmp_path: Path) -> None:
    """Two processes preparing the same model at once both succeed; one folder results."""
    env = dict(os.environ, LORAMUX_HOME=str(tmp_path))
    cmd = [sys.executable, "-m", "loramux.cli", "models", "prepare", "--log-level", "WARNING"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["smollm2-135m-instruct"]
    marker = json.loads((models / "smollm2-135m-instruct" / PREPARED_MARKER).read_text())
    assert marker["name"] == "smollm2-135m-instruct"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "preparing" not in again.stderr


@pytest.mark.slow
def test_default_model_in_nf4_knows_the_capital_of_france(smollm2: ResolvedModel) -> None:
    import bitsandbytes as bnb

    model = load_base_model(smollm2, quantization="nf4", device="cpu")
    tokenizer = load_tokenizer(smollm2)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantisation
    assert q_proj.compute_dtype == torch.bfloat16
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
