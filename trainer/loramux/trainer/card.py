"""The adapter's model card: Hub metadata up front, then how it was made and how well it did.

The YAML front matter is what the Hub indexes (``base_model`` links the adapter to its base
model's page, ``library_name: peft`` gives the "use this model" snippet); the body is for the
person deciding whether to use the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
CARD_TAGS = ("lora", "qlora", "loramux", "peft", "text-generation")
_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


@dataclass
class CardInfo:
    """Everything the card reports; built by the trainer from one run."""

    adapter_name: str
    base_reference: str  # base_model_name_or_path of the adapter (resolvable by LoRAMux)
    base_hub_id: str | None  # the Hub repo of the base model, when there is one
    quantization: str
    options: dict[str, Any]
    train_stats: dict[str, Any]
    eval_stats: dict[str, Any] | None
    results: dict[str, Any]
    trainable_params: int
    total_params: int
    base_weights: dict[str, Any] = field(default_factory=dict)  # train.base_weights()
    compute: dict[str, Any] = field(default_factory=dict)  # ComputePrecision.to_dict()
    loss_curve: str | None = None  # file name inside the adapter folder
    extra_tags: list[str] = field(default_factory=list)


def card_metadata(info: CardInfo) -> dict[str, Any]:
    tags = list(dict.fromkeys([*CARD_TAGS, *info.extra_tags]))
    metadata: dict[str, Any] = {}
    if info.base_hub_id:
        metadata["base_model"] = info.base_hub_id
        tags.append(f"base_model:adapter:{info.base_hub_id}")
    metadata["library_name"] = "peft"
    metadata["pipeline_tag"] = "text-generation"
    metadata["tags"] = tags
    return metadata


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def render_model_card(info: CardInfo) -> str:
    from huggingface_hub import ModelCardData

    front = ModelCardData(**card_metadata(info)).to_yaml()
    o, r, t = info.options, info.results, info.train_stats
    percent = 100.0 * info.trainable_params / info.total_params if info.total_params else 0.0
    base_line = (
        f"[{info.base_hub_id}](https://huggingface.co/{info.base_hub_id})"
        if info.base_hub_id
        else f"`{info.base_reference}`"
    )
    compute = _DTYPE_NAMES.get(info.compute.get("dtype", "bfloat16"), "bf16")
    method = (
        f"LoRA on the frozen {compute} base model"
        if info.quantization == "none"
        else f"QLoRA (the base model frozen in 4-bit {info.quantization.upper()} with double "
        f"quantization and {compute} compute)"
    )
    targets = ", ".join(o["target_modules"])
    weights = info.base_weights.get("weights") or f"`{info.base_reference}`"
    revision = info.base_weights.get("revision") or "not known"
    loss_on = "all tokens" if o["train_on_prompt"] else "assistant / completion tokens"
    lines = [
        "---",
        front.rstrip(),
        "---",
        "",
        f"# {info.adapter_name}",
        "",
        f"A LoRA adapter for {base_line}, trained by LoRAMux with {method}: only the low-rank "
        f"matrices were trained ({info.trainable_params:,} of {info.total_params:,} "
        f"parameters, {percent:.2f}%).",
        "",
        f"Trained on: {weights}.",
        "",
        "## Results",
        "",
        "| | value |",
        "|---|---|",
        f"| final train loss | {_loss(r.get('train_loss'))} |",
        f"| final eval loss | {_loss(r.get('eval_loss'))} |",
        f"| eval loss before training | {_loss(r.get('initial_eval_loss'))} |",
        f"| optimizer steps | {r.get('steps', 'n/a')} |",
        f"| epochs | {r.get('epochs', 0):.2f} |",
        f"| training time | {r.get('runtime_s', 0):.0f} s |",
        "",
    ]
    if info.loss_curve:
        lines += [f"![loss curve]({info.loss_curve})", ""]
    # QLoRA trains these rows of the embedding too (PEFT's trainable_token_indices)
    tokens = ", ".join(f"`{t}`" for t in o.get("trainable_tokens") or []) or "none"
    lines += [
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{info.base_reference}` |",
        f"| base revision | {revision} |",
        f"| quantization | {info.quantization} |",
        f"| compute dtype | {compute} ({info.compute.get('reason', 'bf16, the default')}) |",
        f"| LoRA rank / alpha / dropout | {o['rank']} / {o['lora_alpha']:g} / "
        f"{o['lora_dropout']:g} |",
        f"| target modules | {targets} |",
        f"| rsLoRA | {'yes' if o['use_rslora'] else 'no'} |",
        f"| DoRA | {'yes' if o.get('use_dora') else 'no'} |",
        f"| trainable tokens | {tokens} |",
        f"| learning rate / scheduler / warmup | {o['learning_rate']:g} / {o['lr_scheduler']} / "
        f"{o['warmup']:g} |",
        f"| batch size x gradient accumulation | {o['batch_size']} x {o['grad_accum']} |",
        f"| epochs / max steps | {o['epochs']:g} / {o['max_steps'] or '-'} |",
        f"| max sequence length | {o['max_seq_len']} |",
        f"| optimizer | {r.get('optimizer', o['optimizer'])} |",
        f"| loss on | {loss_on} |",
        f"| seed | {o['seed']} |",
        "",
        "## Data",
        "",
        "| | train | eval |",
        "|---|---|---|",
    ]
    e = info.eval_stats or {}
    for key, label in (
        ("records", "records"),
        ("skipped_bad_records", "bad records skipped"),
        ("examples", "examples used"),
        ("truncated", "truncated to max length"),
        ("tokens", "tokens"),
        ("target_tokens", "tokens with a loss"),
        ("mean_tokens", "mean tokens per example"),
    ):
        lines.append(f"| {label} | {t.get(key, '-')} | {e.get(key, '-')} |")
    lines += [
        "",
        "## Use",
        "",
        "With PEFT:",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("<this repo or folder>")',
        "```",
        "",
        "With a LoRAMux server (serves many adapters on one 4-bit base):",
        "",
        "```bash",
        f"loramux publish <this folder> --publish-to HOST:PORT --adapter-name {info.adapter_name}",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, info: CardInfo) -> Path:
    path = folder / CARD_FILE
    path.write_text(render_model_card(info), encoding="utf-8")
    return path
