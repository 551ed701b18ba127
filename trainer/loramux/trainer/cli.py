"""`loramux train` and `loramux publish`.

Registration imports nothing heavy (no torch, no transformers): `loramux --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loramux.core.config import Settings, add_settings_arguments, load_settings

if TYPE_CHECKING:
    from loramux.trainer.options import TrainOptions

EXIT_INTERRUPTED = 130  # the shell's code for "stopped by Ctrl-C"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _register_train(sub)
    _register_publish(sub)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help already says them (the shared settings)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action.default, bool):  # on/off switches: the flag's name says it
            return text
        return super()._get_help_string(action)


def _csv(value: str) -> list[str]:
    items = [part.strip() for part in value.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _register_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from loramux.trainer.options import SCHEDULERS, TrainOptions
    from loramux.trainer.precision import BF16_CPU_FLAGS, COMPUTE_DTYPES

    d = TrainOptions(train_file=Path("-"), output_dir=Path("-"))  # the defaults, shown in help
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter with QLoRA (4-bit base, PEFT output)",
        description=(
            "Train a LoRA adapter on the 4-bit NF4 base model (QLoRA) from a JSONL file of chat "
            "'messages' or 'prompt'/'completion' records, and write it in standard PEFT format "
            "with a model card, a metrics log and a loss curve. Ctrl-C saves a checkpoint; "
            "--resume continues. Optionally publish the result to the Hugging Face Hub and/or "
            "a running LoRAMux server."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("train_file", type=Path, help="training data (JSONL)")
    p.add_argument(
        "-o", "--output-dir", type=Path, required=True, help="folder for the adapter and its logs"
    )

    data = p.add_argument_group("data")
    data.add_argument("--eval-file", type=Path, default=None, help="held-out data (JSONL)")
    data.add_argument(
        "--eval-split",
        type=float,
        default=d.eval_split,
        help="fraction of the training file held out for evaluation (instead of --eval-file)",
    )
    data.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip (and count) bad records instead of stopping before training",
    )
    data.add_argument(
        "--prompt-format",
        choices=("raw", "chat"),
        default=d.prompt_format,
        help="prompt/completion records: raw text, or one user turn + reply in the chat template",
    )
    data.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="compute the loss on every token, not only on assistant/completion tokens",
    )
    data.add_argument("--max-seq-len", type=int, default=d.max_seq_len, help="tokens per example")
    data.add_argument(
        "--packing",
        action="store_true",
        help="pack each batch's examples into one row instead of padding them (position ids "
        "restart per example, attention computed per example, same loss); faster when "
        "lengths vary",
    )

    lora = p.add_argument_group("LoRA")
    lora.add_argument("-r", "--rank", "--lora-r", type=int, default=d.rank, help="LoRA rank r")
    lora.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA alpha")
    lora.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout")
    lora.add_argument(
        "--target-modules",
        type=_csv,
        default=",".join(d.target_modules),
        help="modules to adapt: all-linear, or names such as q_proj,v_proj",
    )
    lora.add_argument("--use-rslora", action="store_true", help="rank-stabilised scaling")
    lora.add_argument(
        "--dora",
        "--use-dora",
        dest="use_dora",
        action="store_true",
        help="DoRA (PEFT's use_dora): LoRA plus a trained magnitude per output channel; "
        "served like any adapter, but not weighted or composed",
    )
    lora.add_argument(
        "--trainable-tokens",
        type=_csv,
        default=[],  # a list: argparse passes a string default through _csv, which refuses ""
        help="train these tokens' embedding rows too (PEFT's trainable_token_indices), e.g. "
        "'<|im_start|>,<|im_end|>' or ids '1,2': each must be one token of the tokenizer; "
        "served up to the server's --max-trainable-tokens, not weighted or composed",
    )

    opt = p.add_argument_group("optimisation")
    opt.add_argument(
        "--learning-rate", "--lr", type=float, default=d.learning_rate, help="peak learning rate"
    )
    opt.add_argument(
        "--lr-scheduler", choices=SCHEDULERS, default=d.lr_scheduler, help="learning-rate schedule"
    )
    opt.add_argument(
        "--warmup",
        type=float,
        default=d.warmup,
        help="warmup: a fraction (< 1) of the steps, or a number of steps",
    )
    opt.add_argument("--epochs", type=float, default=d.epochs, help="passes over the data")
    opt.add_argument("--max-steps", type=int, default=None, help="stop after N steps (not epochs)")
    opt.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="examples per step and process (global batch: batch size x grad accum x nproc)",
    )
    opt.add_argument(
        "--nproc",
        type=int,
        default=d.nproc,
        help="training processes, data-parallel (DDP through torchrun and accelerate): one "
        "per GPU, each with its own 4-bit base; on the CPU they share the cores (gloo)",
    )
    opt.add_argument(
        "--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps"
    )
    opt.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)"
    )
    opt.add_argument("--seed", type=int, default=d.seed, help="for LoRA init, shuffling, dropout")
    opt.add_argument(
        "--optim",
        dest="optimizer",
        default=d.optimizer,
        help="transformers optimizer name; auto = paged_adamw_8bit on CUDA, adamw_torch on CPU",
    )
    opt.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default=d.compute_dtype,
        help="what the 4-bit base layers compute in: auto = bfloat16 on a CUDA GPU with bf16 "
        f"and on a CPU with {' or '.join(BF16_CPU_FLAGS)}, float32 otherwise (bf16 without "
        "native support is emulated, several times slower); the choice and its reason go into "
        "the model card. The adapter serves on the server's bf16-compute base either way",
    )
    opt.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="faster, more memory",
    )

    prog = p.add_argument_group("progress and checkpoints")
    prog.add_argument(
        "--logging-steps",
        type=int,
        default=d.logging_steps,
        help="log the train loss every N steps",
    )
    prog.add_argument(
        "--eval-steps", type=int, default=None, help="evaluate every N steps (default: logging)"
    )
    prog.add_argument(
        "--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps"
    )
    prog.add_argument(
        "--save-total-limit", type=int, default=d.save_total_limit, help="checkpoints kept"
    )
    prog.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --output-dir (or the one given)",
    )
    prog.add_argument(
        "--overwrite", action="store_true", help="replace a previous run in --output-dir"
    )
    prog.add_argument(
        "--report-to",
        type=_csv,
        default=[],
        metavar="tensorboard,wandb",
        help="also log to TensorBoard (logs in OUTPUT/runs) and/or Weights & Biases (WANDB_MODE, "
        "WANDB_PROJECT as usual; files under OUTPUT/wandb unless WANDB_DIR is set)",
    )
    prog.add_argument(
        "--tensorboard", action="store_true", help="the same as --report-to tensorboard"
    )
    prog.add_argument("--no-progress", action="store_true", help="no progress bar")
    prog.add_argument(
        "--no-eval-before",
        dest="eval_before_training",
        action="store_false",
        help="skip the evaluation before the first step",
    )

    _add_publish_targets(p, hub_flag=True, default_name_help="the output folder's name")
    add_settings_arguments(p, ["model"])
    p.set_defaults(func=_train)


def _add_publish_targets(
    p: argparse.ArgumentParser, *, hub_flag: bool, default_name_help: str
) -> None:
    pub = p.add_argument_group("publishing")
    if hub_flag:
        pub.add_argument(
            "--push-to-hub",
            metavar="REPO_ID",
            default=None,
            help="upload to this Hugging Face Hub repo (token: HF_TOKEN or `hf auth login`; "
            "Hub: HF_ENDPOINT)",
        )
    pub.add_argument("--private", action="store_true", help="create the Hub repo private")
    pub.add_argument("--branch", default=None, help="Hub branch to commit to (created if missing)")
    pub.add_argument(
        "--publish-to", metavar="HOST:PORT", default=None, help="upload to a running LoRAMux server"
    )
    pub.add_argument(
        "--adapter-name",
        default=None,
        help=f"adapter name on the server (default: {default_name_help})",
    )
    pub.add_argument("--api-key", default=None, help="server API key [env LORAMUX_API_KEY]")


def _register_publish(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "publish",
        help="publish an adapter folder to the Hugging Face Hub or a LoRAMux server",
        description=(
            "Publish a PEFT adapter folder (adapter_config.json + adapter_model.safetensors, "
            "with its model card). To the Hub: create the repo if needed and upload the adapter "
            "in one commit, then print the commit sha (pin it when pulling) and the URL. To a "
            "server: upload through the LoRAMux client."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("folder", type=Path, help="the adapter folder (a `loramux train` output)")
    p.add_argument(
        "repo_id",
        nargs="?",
        default=None,
        help="Hugging Face Hub repo id, e.g. me/my-adapter (token: HF_TOKEN or `hf auth login`; "
        "Hub: HF_ENDPOINT)",
    )
    _add_publish_targets(p, hub_flag=False, default_name_help="the folder's name")
    add_settings_arguments(p, [])
    p.set_defaults(func=_publish)


def _options(args: argparse.Namespace) -> TrainOptions:
    from loramux.trainer.options import TrainOptions

    resume = args.resume
    return TrainOptions(
        train_file=args.train_file,
        output_dir=args.output_dir,
        eval_file=args.eval_file,
        eval_split=args.eval_split,
        skip_bad_records=args.skip_bad_records,
        prompt_format=args.prompt_format,
        train_on_prompt=args.train_on_prompt,
        max_seq_len=args.max_seq_len,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.target_modules),
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        trainable_tokens=list(args.trainable_tokens),
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler,
        warmup=args.warmup,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        optimizer=args.optimizer,
        gradient_checkpointing=args.gradient_checkpointing,
        compute_dtype=args.compute_dtype,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        resume=resume is not False,
        resume_from=Path(resume) if isinstance(resume, str) else None,
        overwrite=args.overwrite,
        packing=args.packing,
        report_to=list(
            dict.fromkeys([*args.report_to, *(["tensorboard"] if args.tensorboard else [])])
        ),
        nproc=args.nproc,
        progress_bar=not args.no_progress,
        eval_before_training=args.eval_before_training,
    )


def _train(args: argparse.Namespace) -> int:
    from loramux.trainer.distributed import Ranks, launch_processes
    from loramux.trainer.train import train

    settings = load_settings(args)
    options = _options(args)
    _check_publish_args(args, hub_target=args.push_to_hub)
    ranks = Ranks.from_env()
    if options.nproc > 1 and ranks.world_size == 1:
        options.validate()
        return launch_processes(options.nproc, sys.argv[1:])
    result = train(options, settings, echo=print if ranks.is_main else None)
    if result.interrupted:
        return EXIT_INTERRUPTED
    if ranks.is_main:  # one upload, not one per process
        _publish_folder(args, result.output_dir, args.push_to_hub, settings)
    return 0


def _publish(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if not args.repo_id and not args.publish_to:
        raise ValueError("give a Hub REPO_ID and/or --publish-to HOST:PORT")
    _check_publish_args(args, hub_target=args.repo_id)
    _publish_folder(args, args.folder, args.repo_id, settings)
    return 0


def _check_publish_args(args: argparse.Namespace, *, hub_target: str | None) -> None:
    """Mistakes in publishing flags are reported before hours of training, not after."""
    if (args.private or args.branch) and not hub_target:
        raise ValueError("--private and --branch need a Hub repo to publish to")


def _publish_folder(
    args: argparse.Namespace, folder: Path, repo_id: str | None, settings: Settings
) -> None:
    from loramux.trainer.publish import publish_to_server, push_to_hub

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpx2"):  # one INFO line per HTTP request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
    if repo_id:
        published = push_to_hub(folder, repo_id, private=args.private, branch=args.branch)
        print(f"published to the Hub: {published.repo_id}@{published.branch}")
        print(f"commit {published.commit_sha}")
        print(published.url)
    if args.publish_to:
        name = args.adapter_name or Path(folder).resolve().name
        stored = publish_to_server(  # TLS from LORAMUX_TLS, LORAMUX_TLS_CA_FILE, ...
            folder,
            args.publish_to,
            name=name,
            api_key=settings.api_key,
            tls=settings.client_tls,
            ca_file=settings.tls_ca_file,
            client_cert=settings.tls_client_cert,
            client_key=settings.tls_client_key,
            server_name=settings.tls_server_name,
        )
        details = ", ".join(
            f"{key} {getattr(stored, key)}" for key in ("id", "rank") if hasattr(stored, key)
        )
        print(f"uploaded to {args.publish_to} as {name!r}" + (f" ({details})" if details else ""))
    sys.stdout.flush()
