"""What a training run is asked to do: every trainer option, with its default and its checks.

Settings shared with the server (data dir, base model, quantization, device) live in
``loramux.core.config.Settings``; everything that only concerns one training run lives here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loramux.core.errors import InvalidArgument
from loramux.trainer.data import PROMPT_FORMATS
from loramux.trainer.precision import COMPUTE_DTYPES, ComputeDtype

ALL_LINEAR = "all-linear"
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
AUTO = "auto"
REPORTERS = ("tensorboard", "wandb")  # --report-to choices (transformers' integrations)


@dataclass
class TrainOptions:
    train_file: Path
    output_dir: Path
    # -- data --
    eval_file: Path | None = None
    eval_split: float = 0.0
    skip_bad_records: bool = False
    prompt_format: str = "raw"  # how prompt/completion records are rendered: raw text or chat
    train_on_prompt: bool = False  # loss on every token instead of replies only
    max_seq_len: int = 1024
    packing: bool = False  # each batch's examples in one row; attention stays per example
    # -- LoRA --
    rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    use_rslora: bool = False
    use_dora: bool = False  # DoRA: PEFT's use_dora, a magnitude per output channel
    # Trainable tokens (PEFT's trainable_token_indices): token strings or ids as given;
    # their embedding rows are trained and saved beside the LoRA matrices. Empty: none.
    trainable_tokens: list[str] = field(default_factory=list)
    # -- optimisation --
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup: float = 0.03  # < 1: fraction of the steps; >= 1: a number of steps
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    seed: int = 42
    optimizer: str = AUTO  # paged_adamw_8bit on CUDA, adamw_torch on the CPU
    gradient_checkpointing: bool = True
    # What the 4-bit base layers compute in (`loramux.trainer.precision`): auto = bf16 where
    # the GPU or CPU has it natively, float32 elsewhere (bf16 emulated is several times slower).
    compute_dtype: ComputeDtype = "auto"
    # -- progress, checkpoints --
    logging_steps: int = 10
    eval_steps: int | None = None  # default: logging_steps
    save_steps: int = 100
    save_total_limit: int = 2
    resume: bool = False
    resume_from: Path | None = None  # a specific checkpoint folder
    overwrite: bool = False
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb
    nproc: int = 1  # processes (one per GPU) started by `loramux train --nproc`
    progress_bar: bool = True
    eval_before_training: bool = True  # the starting eval loss, to show how much was learnt

    def __post_init__(self) -> None:
        self.train_file = Path(self.train_file).expanduser()
        self.output_dir = Path(self.output_dir).expanduser()
        if self.eval_file is not None:
            self.eval_file = Path(self.eval_file).expanduser()
        if self.resume_from is not None:
            self.resume_from = Path(self.resume_from).expanduser()
            self.resume = True

    def validate(self) -> None:
        """Refuse options that cannot work, naming the option."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise InvalidArgument(name, f"must be {rule}, got {getattr(self, name)!r}")

        need(self.rank >= 1, "rank", ">= 1")
        need(_finite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "> 0")
        need(_finite(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        need(bool(self.target_modules) and all(self.target_modules), "target_modules", "non-empty")
        need(all(self.trainable_tokens), "trainable_tokens", "token strings or ids, none empty")
        need(
            len(set(self.trainable_tokens)) == len(self.trainable_tokens),
            "trainable_tokens",
            "without repeats",
        )
        need(
            _finite(self.learning_rate) and 0 < self.learning_rate < 1, "learning_rate", "in (0, 1)"
        )
        need(self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"one of {', '.join(SCHEDULERS)}")
        need(_finite(self.warmup) and self.warmup >= 0, "warmup", ">= 0")
        need(
            self.warmup < 1 or float(self.warmup).is_integer(),
            "warmup",
            "a fraction < 1 or a whole number of steps",
        )
        need(_finite(self.epochs) and self.epochs > 0, "epochs", "> 0")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(_finite(self.max_grad_norm) and self.max_grad_norm >= 0, "max_grad_norm", ">= 0")
        need(self.max_seq_len >= 8, "max_seq_len", ">= 8")
        need(self.prompt_format in PROMPT_FORMATS, "prompt_format", " or ".join(PROMPT_FORMATS))
        need(_finite(self.eval_split) and 0 <= self.eval_split < 1, "eval_split", "in [0, 1)")
        need(self.logging_steps >= 1, "logging_steps", ">= 1")
        need(self.eval_steps is None or self.eval_steps >= 1, "eval_steps", ">= 1")
        need(self.save_steps >= 1, "save_steps", ">= 1")
        need(self.save_total_limit >= 1, "save_total_limit", ">= 1")
        need(self.nproc >= 1, "nproc", ">= 1")
        need(
            self.compute_dtype in COMPUTE_DTYPES,
            "compute_dtype",
            f"one of {', '.join(COMPUTE_DTYPES)}",
        )
        need(
            all(name in REPORTERS for name in self.report_to),
            "report_to",
            f"a list of {', '.join(REPORTERS)}",
        )
        if self.eval_file is not None and self.eval_split:
            raise InvalidArgument("eval_split", "give either --eval-file or --eval-split, not both")
        if self.resume and self.overwrite:
            raise InvalidArgument("resume", "--resume and --overwrite contradict each other")

    @property
    def lora_target_modules(self) -> str | list[str]:
        """PEFT's spelling: the string "all-linear" or a list of module names."""
        if self.target_modules == [ALL_LINEAR]:
            return ALL_LINEAR
        return list(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the run summary and the model card."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        return data


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
