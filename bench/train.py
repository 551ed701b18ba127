"""QLoRA training cost: LoRAMux's trainer against a plain PEFT + transformers Trainer script.

    python -m bench.train              # 30 optimizer steps per run, 2 interleaved repetitions
    python -m bench.train --quick      # 5 steps, 1 repetition, no bf16 run
    python -m bench.train --suite packing   # padding vs --packing on short chats
    python -m bench.train --suite packing --data chat-varied   # ... of long-tailed lengths
    python -m bench.train --suite nproc     # 1 process vs --nproc 2, same global batch
    python -m bench.train --suite dtype     # NF4 base, bf16 vs float32 compute

Runs, each in its own Python process (so peak memory is that run's alone, read as the
process's RSS high-water mark with getrusage, plus CUDA's max allocated on a GPU):

* loramux-nf4   `loramux.trainer.train` on the 4-bit NF4 base (the product path)
* plain-nf4     the script people write from the PEFT/QLoRA docs: BitsAndBytesConfig,
                prepare_model_for_kbit_training, get_peft_model, transformers Trainer
* loramux-bf16  `loramux.trainer.train` on the unquantised bf16 base (eval-loss reference)

The three compute in bf16 (`--compute-dtype bfloat16`, the recipe's
`bnb_4bit_compute_dtype`), whatever the machine, so the comparison holds across machines.

Same data (a generated prompt/completion set, loss on completions only), same LoRA
(rank 16, alpha 32, dropout 0.05, all linear layers), same optimiser, schedule, batch,
steps, seed and gradient checkpointing. A step's time is the gap between consecutive
`Trainer.training_step` calls (forward, backward, optimiser step, logging), timed by
patching that method in the child process identically for every run; the first two steps
are left out as warm-up; medians (of step times, and of each step's tokens/s), so a step
slowed by a neighbour's burst does not count.
Wall time suffers from other processes on a shared machine, so the process's CPU time
per step is reported too (and compared): it counts only this run's own work. Tokens/s
counts non-padding input tokens.

Suite `packing`: LoRAMux's trainer on short chats, once padded (the default collator) and
once with `--packing` (each batch's examples in as few rows as fit, attention kept per
example by the trainer's varlen attention), the same batches, steps and seed: training
tokens/s and final eval loss side by side. `--data chat` (the default, the target's data): a
user turn of 1-2 sentences and a reply of 1-3, so with the chat template's system prompt
every example is 170-185 tokens and padding is only ~25% of a padded batch. `--data
chat-varied`: replies of 1-16 sentences, log-uniform, a long tail as real instruction data
has, where padding is about half of a padded batch.

Suite `nproc`: the same run in 1 process (batch B) and in N data-parallel processes (batch
B/N each, same global batch; DDP through accelerate, gloo on the CPU), step time compared.
On a CPU machine the processes share its cores (OMP_NUM_THREADS = cores / N). Rank 0
reports: its tokens/s and CPU time are its own share (1/N of the batch, one of N processes);
the step time, for the same global batch, is what compares.

Suite `dtype`: LoRAMux's trainer on the NF4 base with `--compute-dtype bfloat16` and with
`float32`, the same data, batches, steps and seed: step time, peak memory and eval loss
side by side (ratios to bf16). On a CPU without native bf16 (AVX2) bf16 is emulated through
float32 conversions, which `--compute-dtype auto` avoids by choosing float32 there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    PASSAGE,
    RESULTS_DIR,
    format_table,
    machine_info,
    median,
    plot_path,
    print_machine,
    pyplot,
    write_json,
)

RUNS = ("loramux-nf4", "plain-nf4", "loramux-bf16")
SUITES = {
    "qlora": RUNS,
    "packing": ("loramux-pad", "loramux-pack"),
    "nproc": ("nproc-1", "nproc-2"),
    "dtype": ("nf4-bfloat16", "nf4-float32"),
}
WARMUP_STEPS = 2


def write_dataset(folder: Path, train: int, eval_: int, seed: int = 0) -> tuple[Path, Path]:
    """A small, learnable prompt/completion task: sums with a sentence of context."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in PASSAGE.split(".") if s.strip()]

    def record() -> dict[str, str]:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        context = rng.choice(sentences)
        parity = "even" if (a + b) % 2 == 0 else "odd"
        return {
            "prompt": f"{context}\nQuestion: what is {a} plus {b}?\nAnswer:",
            "completion": f" {a} plus {b} is {a + b}, which is an {parity} number.",
        }

    paths = []
    for name, count in (("train.jsonl", train), ("eval.jsonl", eval_)):
        path = folder / name
        path.write_text("".join(json.dumps(record()) + "\n" for _ in range(count)))
        paths.append(path)
    return paths[0], paths[1]


def write_chat_dataset(folder: Path, train: int, eval_: int, seed: int = 0) -> tuple[Path, Path]:
    """Short chats of varied length, as instruction data has."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in PASSAGE.split(".") if s.strip()]

    def record() -> dict[str, Any]:
        context = " ".join(rng.sample(sentences, rng.randint(1, 2)))
        reply = " ".join(rng.sample(sentences, rng.randint(1, 3)))
        return {
            "messages": [
                {"role": "user", "content": f"{context}\nSay something related."},
                {"role": "assistant", "content": reply},
            ]
        }

    paths = []
    for name, count in (("chat-train.jsonl", train), ("chat-eval.jsonl", eval_)):
        path = folder / name
        path.write_text("".join(json.dumps(record()) + "\n" for _ in range(count)))
        paths.append(path)
    return paths[0], paths[1]


def write_varied_chat_dataset(
    folder: Path, train: int, eval_: int, seed: int = 0
) -> tuple[Path, Path]:
    """Short chats whose replies vary in length as real instruction data's do (a long tail:
    1 to 16 sentences, log-uniform), unlike `write_chat_dataset`'s nearly uniform ones."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in PASSAGE.split(".") if s.strip()]

    def record() -> dict[str, Any]:
        context = " ".join(rng.sample(sentences, rng.randint(1, 2)))
        count = round(math.exp(rng.uniform(0.0, math.log(16))))
        reply = " ".join(rng.choices(sentences, k=count))
        return {
            "messages": [
                {"role": "user", "content": f"{context}\nSay something related."},
                {"role": "assistant", "content": reply},
            ]
        }

    paths = []
    for name, count in (("varied-train.jsonl", train), ("varied-eval.jsonl", eval_)):
        path = folder / name
        path.write_text("".join(json.dumps(record()) + "\n" for _ in range(count)))
        paths.append(path)
    return paths[0], paths[1]


DATASETS = {"chat": write_chat_dataset, "chat-varied": write_varied_chat_dataset}


# ---- the child process: one training run ----
def real_tokens(inputs: dict[str, Any]) -> int:
    """Non-padding input tokens of a batch. Padded: the attention mask's ones. Packed (no
    mask): every position but each row's padding, which is the row's last segment (its
    positions restart at 0) when none of its labels is trained; a real example always has
    a trained label (the trainer drops those without)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    total = 0
    for positions, labels in zip(inputs["position_ids"], inputs["labels"], strict=True):
        start = int((positions == 0).nonzero().max())  # the row's last segment
        padding = bool((labels[start:] == -100).all())
        total += start if padding else positions.numel()
    return total


class StepTimer:
    """Patches transformers.Trainer.training_step to note when each step starts."""

    def __init__(self) -> None:
        from transformers import Trainer

        self.starts: list[float] = []
        self.cpu_starts: list[float] = []  # process CPU time: less hurt by other processes
        self.tokens: list[int] = []
        original = Trainer.training_step
        timer = self

        def training_step(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            timer.starts.append(time.perf_counter())
            timer.cpu_starts.append(time.process_time())
            timer.tokens.append(real_tokens(inputs))
            return original(self, model, inputs, *args, **kwargs)

        Trainer.training_step = training_step  # type: ignore[method-assign]

    def result(self) -> dict[str, Any]:
        """Step i lasts from its start to step i+1's (the last step, followed by evaluation
        and saving, is not counted)."""
        periods = [b - a for a, b in itertools.pairwise(self.starts)]
        cpu = [b - a for a, b in itertools.pairwise(self.cpu_starts)]
        steady = periods[WARMUP_STEPS:] or periods
        steady_tokens = self.tokens[: len(periods)][WARMUP_STEPS:] or self.tokens[: len(periods)]
        # The median step's rate, as for the step times: one step slowed by a neighbour's
        # burst (a shared machine) must not move it, as it would move a ratio of sums.
        rates = [n / t for n, t in zip(steady_tokens, steady, strict=True)]
        return {
            "steps": len(self.starts),
            "step_s": periods,
            "step_tokens": self.tokens[: len(periods)],
            "step_s_median": median(steady),
            "step_cpu_s": cpu,
            "step_cpu_s_median": median(cpu[WARMUP_STEPS:] or cpu),
            "tokens_per_s": median(rates) if rates else float("nan"),
        }


def run_loramux(
    options: dict[str, Any], quantization: str, device: str
) -> tuple[float | None, float | None]:
    from loramux.core.config import Settings
    from loramux.trainer.options import TrainOptions
    from loramux.trainer.train import train

    result = train(
        TrainOptions(**options),
        Settings(quantization=quantization, device=device),
        echo=None,
    )
    return result.eval_loss, result.initial_eval_loss


def run_plain(options: dict[str, Any], device: str) -> float | None:
    """The plain QLoRA recipe, written as a user would from PEFT's and transformers' docs."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from loramux.core.config import Settings
    from loramux.core.models import resolve_base_model

    path = str(resolve_base_model("smollm2-135m-instruct", Settings().models_dir).path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(line: str) -> dict[str, list[int]]:
        record = json.loads(line)
        prompt_ids = tokenizer(record["prompt"])["input_ids"]
        ids = tokenizer(record["prompt"] + record["completion"] + tokenizer.eos_token)["input_ids"][
            : options["max_seq_len"]
        ]
        labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    train_set = [encode(x) for x in Path(options["train_file"]).read_text().splitlines()]
    eval_set = [encode(x) for x in Path(options["eval_file"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map={"": device},
    )
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=options["rank"],
            lora_alpha=options["lora_alpha"],
            lora_dropout=options["lora_dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=options["output_dir"],
        per_device_train_batch_size=options["batch_size"],
        per_device_eval_batch_size=options["batch_size"],
        gradient_accumulation_steps=options["grad_accum"],
        learning_rate=options["learning_rate"],
        lr_scheduler_type=options["lr_scheduler"],
        warmup_steps=options["warmup"],
        max_steps=options["max_steps"],
        optim="adamw_torch" if device == "cpu" else "paged_adamw_8bit",
        seed=options["seed"],
        use_cpu=device == "cpu",
        bf16=device != "cpu",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=options["logging_steps"],
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=train_set,  # type: ignore[arg-type]
        eval_dataset=eval_set,  # type: ignore[arg-type]
        data_collator=DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8
        ),
    )
    trainer.train()
    return float(trainer.evaluate()["eval_loss"])


def child(run: str, options_json: str, device: str) -> None:
    """Entry point of one training run; prints one JSON line with its measurements."""
    import torch

    from bench.common import set_threads

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of N processes: its share of cores
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    else:
        set_threads()
    options = json.loads(options_json)
    timer = StepTimer()
    started = time.perf_counter()
    initial_eval_loss = None
    if run == "plain-nf4":
        eval_loss = run_plain(options, device)
    else:
        quantization = "none" if run == "loramux-bf16" else "nf4"
        eval_loss, initial_eval_loss = run_loramux(options, quantization, device)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 reports for the run
    report = {
        "run": run,
        "eval_loss": eval_loss,
        "initial_eval_loss": initial_eval_loss,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        ),
        **timer.result(),
    }
    print("BENCH-RESULT " + json.dumps(report), flush=True)


def spawn(
    run: str, options: dict[str, Any], device: str, log: Path, nproc: int = 1
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.train",
        "--child",
        run,
        "--options",
        json.dumps(options),
        "--device",
        device,
    ]
    if nproc > 1:  # N data-parallel children, started as `loramux train --nproc` does
        command[3:3] = ["--launch", str(nproc)]
    started = time.perf_counter()
    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("BENCH-RESULT ")]
    if done.returncode != 0 or not lines:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{run} failed (exit {done.returncode}); log tail:\n{tail}")
    report: dict[str, Any] = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
    report["process_s"] = time.perf_counter() - started
    report["load_average_1m"] = [load_before, os.getloadavg()[0]]
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=320)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--quick", action="store_true", help="5 steps, 1 rep, NF4 runs only")
    parser.add_argument("--out", default="train")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--launch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--suite", choices=sorted(SUITES), default="qlora")
    parser.add_argument("--nproc", type=int, default=2, help="processes in the nproc suite")
    parser.add_argument(
        "--data",
        choices=sorted(DATASETS),
        default="chat",
        help="packing suite's data: chat (nearly uniform lengths, the target's) or "
        "chat-varied (long-tailed reply lengths)",
    )
    args = parser.parse_args(argv)
    if args.child and args.launch > 1:
        from loramux.trainer.distributed import launch

        command = [sys.executable, "-m", "bench.train", "--child", args.child]
        command += ["--options", args.options, "--device", args.device]
        sys.exit(launch(args.launch, command))
    if args.child:
        child(args.child, args.options, args.device)
        return None
    if args.suite != "qlora":
        if args.runs == ",".join(RUNS):
            args.runs = ",".join(SUITES[args.suite])
        if args.out == "train":
            args.out = f"train-{args.suite}"
            if args.suite == "packing" and args.data != "chat":
                args.out += f"-{args.data}"
    if args.quick:
        args.steps, args.reps = 5, 1
        if args.suite == "qlora":
            args.runs = "loramux-nf4,plain-nf4"
        args.train_examples, args.eval_examples = 40, 8
    runs = [r for r in args.runs.split(",") if r]

    info = machine_info()
    print_machine(info)
    started = time.perf_counter()
    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loramux-bench-train-") as tmp:
        root = Path(tmp)
        if args.suite == "packing":
            train_file, eval_file = DATASETS[args.data](
                root, args.train_examples, args.eval_examples
            )
        else:
            train_file, eval_file = write_dataset(root, args.train_examples, args.eval_examples)
        for rep in range(args.reps):
            order = runs[rep % len(runs) :] + runs[: rep % len(runs)]
            for run in order:
                options = {
                    "train_file": str(train_file),
                    "eval_file": str(eval_file),
                    "output_dir": str(root / f"{run}-{rep}"),
                    "rank": 16,
                    "lora_alpha": 32,
                    "lora_dropout": 0.05,
                    "learning_rate": 1e-3,
                    "lr_scheduler": "cosine",
                    "warmup": 2,
                    "max_steps": args.steps,
                    "batch_size": args.batch_size,
                    "grad_accum": 1,
                    "seed": 42,
                    "max_seq_len": 1024 if args.suite == "packing" else 256,
                    "logging_steps": args.steps,
                    # bf16 as the plain recipe, except where the dtype suite says otherwise
                    "compute_dtype": run.removeprefix("nf4-")
                    if args.suite == "dtype"
                    else "bfloat16",
                }
                nproc = args.nproc if run == f"nproc-{args.nproc}" else 1
                if run == "loramux-pack":
                    options["packing"] = True
                if run.startswith("nproc-"):
                    options["batch_size"] = args.batch_size // nproc  # same global batch
                if run != "plain-nf4":
                    # The eval before training (outside the timed steps) shows how much of
                    # an NF4-vs-bf16 gap is the quantised base itself rather than learning.
                    options.update(
                        eval_steps=args.steps, eval_before_training=True, progress_bar=False
                    )
                report = spawn(run, options, args.device, root / f"{run}-{rep}.log", nproc)
                report["rep"] = rep
                reports.append(report)
                print(
                    f"# {run} rep {rep}: {report['step_s_median']:.2f} s/step "
                    f"({report['step_cpu_s_median']:.2f} CPU s), "
                    f"{report['tokens_per_s']:.0f} tok/s, peak RSS {report['peak_rss_mb']:.0f} MB, "
                    f"eval loss {report['eval_loss']:.4f}",
                    flush=True,
                )

    summary = summarise(reports, SUITES[args.suite])
    title = f"QLoRA training on {info.get('gpu') or info['cpu_model']}, SmolLM2-135M"
    if args.suite != "qlora":
        title += f", suite {args.suite}"
    if args.suite == "packing":
        title += f", data {args.data}"
    print(f"\n## train: {title}, {args.steps} steps x batch {args.batch_size}")
    table = format_table(
        [
            "run",
            "s/step p50",
            "CPU s/step p50",
            "tokens/s",
            "peak RSS MB",
            "CUDA peak MB",
            "eval loss before",
            "eval loss",
            "step time x ref",
            "CPU time x ref",
            "tokens/s x ref",
            "eval loss x ref",
            "reps",
        ],
        [
            [
                s["run"],
                s["step_s_median"],
                s["step_cpu_s_median"],
                s["tokens_per_s"],
                s["peak_rss_mb"],
                s["cuda_peak_mb"] if s["cuda_peak_mb"] is not None else float("nan"),
                s["initial_eval_loss"],
                s["eval_loss"],
                s["step_time_vs_ref"],
                s["step_cpu_vs_ref"],
                s["tokens_per_s_vs_ref"],
                s["eval_loss_vs_ref"],
                s["reps"],
            ]
            for s in summary
        ],
    )
    print(table, flush=True)
    payload = {
        "benchmark": "train",
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "options")},
        "summary": summary,
        "table": table,
        "runs": reports,
        "seconds": time.perf_counter() - started,
    }
    print(f"# wrote {write_json(args.out, payload, args.results_dir)}")
    image = plot_path(args.out, args.results_dir)
    plot(summary, image, title)
    print(f"# wrote {image}")
    return payload


def summarise(reports: list[dict[str, Any]], order: Sequence[str] = RUNS) -> list[dict[str, Any]]:
    """Medians per run, and ratios to the suite's reference run: timing against the plain
    script (qlora), padding (packing), one process (nproc) or bf16 compute (dtype); eval loss
    against bf16 (qlora) or the same reference."""

    def by_run(run: str, key: str) -> float:
        return median(r[key] for r in reports if r["run"] == run and r[key] is not None)

    summary = []
    names = [r for r in order if any(x["run"] == r for x in reports)]
    for run in names:
        cuda = [r["cuda_peak_mb"] for r in reports if r["run"] == run and r["cuda_peak_mb"]]
        summary.append(
            {
                "run": run,
                "reps": sum(r["run"] == run for r in reports),
                "step_s_median": by_run(run, "step_s_median"),
                "step_cpu_s_median": by_run(run, "step_cpu_s_median"),
                "tokens_per_s": by_run(run, "tokens_per_s"),
                "peak_rss_mb": by_run(run, "peak_rss_mb"),
                "cuda_peak_mb": median(cuda) if cuda else None,
                "eval_loss": by_run(run, "eval_loss"),
                "initial_eval_loss": by_run(run, "initial_eval_loss"),
            }
        )
    timing_ref = {"plain-nf4", "loramux-pad", "nproc-1", "nf4-bfloat16"}
    plain = next((s for s in summary if s["run"] in timing_ref), None)
    loss_ref = next(
        (
            s
            for s in summary
            if s["run"] in {"loramux-bf16", "loramux-pad", "nproc-1", "nf4-bfloat16"}
        ),
        None,
    )
    nan = float("nan")
    for s in summary:
        s["step_time_vs_ref"] = s["step_s_median"] / plain["step_s_median"] if plain else nan
        s["step_cpu_vs_ref"] = s["step_cpu_s_median"] / plain["step_cpu_s_median"] if plain else nan
        s["tokens_per_s_vs_ref"] = s["tokens_per_s"] / plain["tokens_per_s"] if plain else nan
        s["eval_loss_vs_ref"] = s["eval_loss"] / loss_ref["eval_loss"] if loss_ref else nan
    return summary


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    names = [s["run"] for s in summary]
    for ax, key, label in zip(
        axes,
        ("step_s_median", "peak_rss_mb", "eval_loss"),
        ("seconds per step (p50)", "peak RSS (MB)", "final eval loss"),
        strict=True,
    ):
        ax.bar(names, [s[key] for s in summary], color=["tab:blue", "tab:gray", "tab:orange"])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
