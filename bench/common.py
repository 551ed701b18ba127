"""What every benchmark shares: the machine record, models, adapters, prompts, output.

Models: `smollm2` (the real default base model, NF4 on the CPU) or `llama3-8b-random`
(a randomly initialised model of Llama-3-8B's shape, quantised to NF4 in place on the
GPU; speed does not depend on the weights' values, and nothing has to be downloaded).
`llama-tiny-random` takes the 8B model's code path at toy size: a CPU smoke test of it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL_CHOICES = ("smollm2", "llama3-8b-random", "llama-tiny-random")

# A fixed English passage: prompts are windows of its tokens, so every configuration
# sees the same, realistic token ids.
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a "
    "small brass lantern and a notebook in which he recorded the weather, the ships that "
    "passed, and the birds that rested on the railing. Over forty years the notebooks "
    "filled three shelves of the keeper's cottage. Historians later used them to "
    "reconstruct storms that no instrument had measured, the arrival of steamships on a "
    "route once sailed only by schooners, and the slow decline of the puffin colony on "
    "the northern rocks. Each entry was short: the wind's direction and force, the state "
    "of the sea, visibility in nautical miles, and a line or two of remarks. Some remarks "
    "were practical, such as a note to order more lamp oil before the winter, while "
    "others were surprisingly personal, describing the colour of the sky after a squall "
    "or the sound of the fog horn from a neighbouring island. When the light was "
    "automated, the last keeper left the notebooks to the village library, where "
    "students still read them to learn how careful observation, repeated patiently "
    "every day, turns into knowledge that outlasts the observer. The library also keeps "
    "a set of charts drawn by the first keeper, showing soundings, reefs and anchorages "
    "around the headland, corrected in pencil whenever a survey vessel reported a change."
)


def set_threads() -> int:
    """Use every core the machine has (2 here); report how many."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was at start."""
    import peft
    import transformers

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["git_commit"] = _git("rev-parse", "HEAD")
    # Uncommitted engine edits would make the numbers unreproducible from the commit alone.
    info["engine_files_modified"] = _git("status", "--porcelain", "--", "server", "core")
    return info


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except OSError:
        return ""


def print_machine(info: Mapping[str, Any]) -> None:
    load = " ".join(f"{x:.2f}" for x in info["load_average_at_start"])
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    print(
        f"# machine: {info['cpu_model']}, {info['cpu_count']} cores{gpu}; "
        f"torch {info['torch']} ({info['torch_threads']} threads); load average {load}",
        flush=True,
    )


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (NaN for no data)."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (prints readably and pastes into docs)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in text
    ]
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN (no measurement) as null: strict JSON readers reject NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(name: str, payload: Mapping[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(_json_safe(payload), indent=2, default=str, allow_nan=False))
    return path


def plot_path(name: str, results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    return results_dir / f"{name}.png"


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- models ----
@dataclass
class BaseModel:
    """A loaded base model kept pristine; engines and PEFT each get their own copy."""

    name: str
    model: Any  # never wrapped or adapted itself
    tokenizer: Any
    resolved: Any  # loramux ResolvedModel, or None for the random model
    device: torch.device

    def fresh_copy(self) -> Any:
        """An independent copy (the engine wraps layers in place; PEFT injects its own).

        Copied on a thread of its own, like every parallel torch op of a benchmark outside
        an engine: see loramux.server.threads.
        """
        from loramux.server.threads import in_own_thread

        return in_own_thread(lambda: copy.deepcopy(self.model), "copy-model")

    def prompts(self, count: int, length: int) -> list[list[int]]:
        """`count` prompts of exactly `length` tokens: real text for a real model, seeded
        random ids for a random one (its output is noise whatever the input)."""
        if self.resolved is not None:
            return make_prompts(self.tokenizer, count, length)
        generator = torch.Generator().manual_seed(0)
        vocab = int(self.model.config.vocab_size)
        return torch.randint(3, vocab, (count, length), generator=generator).tolist()

    def dequantized_weights(self) -> dict[str, torch.Tensor]:
        """Each adaptable layer's dequantised weight [out, in] float32 (DoRA magnitudes)."""
        from loramux.server.lora.dora import dequantized_weight

        layers = self.linear_shapes()
        return {name: dequantized_weight(self.model.get_submodule(name)) for name in layers}

    def linear_shapes(self) -> dict[str, Any]:
        from loramux.server.lora import base_linear_shapes

        return base_linear_shapes(self.model)


def load_model(name: str, device: str) -> BaseModel:
    """Loaded on a thread of its own (see loramux.server.threads)."""
    from loramux.server.threads import in_own_thread

    return in_own_thread(lambda: _load_model(name, device), "load-model")


def _load_model(name: str, device: str) -> BaseModel:
    if name == "smollm2":
        from loramux.core.config import Settings
        from loramux.core.models import load_base_model, load_tokenizer, resolve_base_model

        resolved = resolve_base_model("smollm2-135m-instruct", Settings().models_dir)
        model = load_base_model(resolved, "nf4", device)
        return BaseModel(
            name, model, load_tokenizer(resolved), resolved, next(model.parameters()).device
        )
    if name in ("llama3-8b-random", "llama-tiny-random"):
        shape = TINY_SHAPE if name == "llama-tiny-random" else {}
        model = random_llama3_8b_nf4(torch.device(device), **shape)
        tokenizer = synthetic_tokenizer(int(model.config.vocab_size))
        return BaseModel(name, model, tokenizer, None, torch.device(device))
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODEL_CHOICES)}")


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A tokenizer whose token i is the word `t<i>`: ids to text and back, built in memory.

    The random model needs a tokenizer only to stream text; this one needs no files, so
    the GPU run does not depend on SmolLM2 being prepared there.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t2"
    )


LLAMA3_8B_SHAPE: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


TINY_SHAPE: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def random_llama3_8b_nf4(device: torch.device, **shape: Any) -> Any:
    """Llama-3-8B's shape with random weights, every linear layer but lm_head in NF4.

    Built in bf16 on the device and quantised module by module with bitsandbytes (double
    quantisation, bf16 compute: what `load_base_model` asks transformers for), so no 16 GB
    checkpoint has to be written and read back. `shape` overrides the sizes (smoke tests).
    """
    import bitsandbytes as bnb
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{**LLAMA3_8B_SHAPE, **shape},
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    for parent in list(model.model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            quantised = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            weight: Any = bnb.nn.Params4bit(
                child.weight.data,
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
            )
            quantised.weight = weight.to(device)  # moving it is what quantises it
            setattr(parent, child_name, quantised)
            del child
    setattr(model, "is_loaded_in_4bit", True)  # noqa: B010 - PEFT reads it to pick 4-bit LoRA
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


# ---- adapters and prompts ----
def write_adapters(
    root: Path,
    linears: Mapping[str, Any],
    ranks: Sequence[int],
    prefix: str,
    *,
    distinct_files: int = 0,
    seed_offset: int = 0,
    dora_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Path]:
    """Random all-linear PEFT adapters `prefix0..`, one per entry of `ranks` (DoRA adapters
    with `dora_weights`, the base's dequantised weights: see write_random_adapter).

    With distinct_files = N > 0, adapter i >= N hard-links adapter i % N's files (same
    rank): a separate adapter to the server (its own id, load and slot), but cheap to
    write for an 8B model whose rank-16 adapter is 84 MB. Written on a thread that ends
    (large random tensors are parallel torch ops: see loramux.server.threads).
    """
    from loramux.server.threads import in_own_thread

    return in_own_thread(
        lambda: _write_adapters(
            root, linears, ranks, prefix, distinct_files, seed_offset, dora_weights
        ),
        "write-adapters",
    )


def _write_adapters(
    root: Path,
    linears: Mapping[str, Any],
    ranks: Sequence[int],
    prefix: str,
    distinct_files: int,
    seed_offset: int,
    dora_weights: Mapping[str, torch.Tensor] | None,
) -> dict[str, Path]:
    from loramux.server.synthetic import write_random_adapter

    folders: dict[str, Path] = {}
    for i, rank in enumerate(ranks):
        folder = root / f"{prefix}{i}"
        source = i % distinct_files if distinct_files else i
        if source != i and ranks[source] == rank:
            folder.mkdir(parents=True, exist_ok=True)
            for file in folders[f"{prefix}{source}"].iterdir():
                os.link(file, folder / file.name)
        else:
            write_random_adapter(
                folder,
                linears,
                rank=rank,
                alpha=2.0 * rank,
                seed=seed_offset + i,
                scale=0.02,
                dora_weights=dora_weights,
            )
        folders[f"{prefix}{i}"] = folder
    return folders


def make_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids: windows over a fixed passage."""
    ids = list(tokenizer(PASSAGE, add_special_tokens=False)["input_ids"])
    while len(ids) < length + count:
        ids = ids + ids
    step = max(1, (len(ids) - length) // max(1, count))
    return [ids[i * step : i * step + length] for i in range(count)]


def cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
