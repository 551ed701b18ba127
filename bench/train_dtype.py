"""One QLoRA forward + backward, bf16 against float32 compute, alternating in one process.

    python -m bench.train_dtype [--batch 2 --seq 48 --reps 2 --threads 1]

The short form of `python -m bench.train --suite dtype` for a loaded machine: SmolLM2-135M
in NF4 with LoRA r16 on all linear layers, built by the trainer's own `build_peft_model`
(gradient checkpointing as in training), once per compute dtype; then the same batch of
random tokens through forward + backward in each, alternating, `--reps` times. Process CPU
time is compared (the minimum per dtype): on a shared machine it counts only this work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    import torch

    from loramux.core.config import Settings
    from loramux.core.models import load_base_model, resolve_base_model
    from loramux.trainer.options import TrainOptions
    from loramux.trainer.train import build_peft_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    resolved = resolve_base_model("smollm2-135m-instruct", Settings().models_dir)
    options = TrainOptions(train_file=Path("-"), output_dir=Path("-"))
    models = {}
    for name in ("float32", "bfloat16"):
        base = load_base_model(resolved, "nf4", "cpu", getattr(torch, name))
        models[name] = build_peft_model(base, resolved, options, quantized=True)
        models[name].train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=generator)
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.reps):
        for name, model in models.items():
            started, wall = time.process_time(), time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            cpu[name].append(time.process_time() - started)
            model.zero_grad()
            print(
                f"# {name} rep {rep}: CPU {cpu[name][-1]:.2f} s, wall "
                f"{time.perf_counter() - wall:.2f} s",
                flush=True,
            )
    f32, bf16 = min(cpu["float32"]), min(cpu["bfloat16"])
    print(
        f"batch {args.batch} x {args.seq} tokens, {args.threads} thread(s): forward + backward "
        f"CPU s float32 {f32:.2f}, bfloat16 {bf16:.2f}; bf16 / float32 {bf16 / f32:.1f}x"
    )


if __name__ == "__main__":
    main()
