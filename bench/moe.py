"""Decode throughput on a MoE base with LoRA on its experts, against the same base without.

    python -m bench.moe               # the CPU run (a small random Qwen3-MoE, NF4)
    python -m bench.moe --quick       # fewer repetitions and tokens

Issue 23's bench: one MoE base (Qwen3-MoE's architecture, random weights: 4 layers,
hidden 256, 8 experts of 256, top-2, SmolLM2's tokenizer; attention in NF4, the fused
experts bf16 as bitsandbytes leaves them), 32 requests at batch 32, each on its own
expert adapter (PEFT's `target_parameters` on `experts.gate_up_proj` and
`experts.down_proj`, rank 8, written in the layout PEFT saves), side by side with the same
32 requests on the base model, in one engine, repetitions alternating so that a slow spell
on this shared machine hits both alike; the ratio is taken per repetition against the
base model in that repetition, then the median.

Timing: `e2e` is submit-to-last-token wall time for the batch (prefill included);
tokens/s is every row's generated tokens over it (no prefix cache). Adapters are made
resident (loaded into device slots) by an untimed first repetition.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench.common import (
    format_table,
    machine_info,
    make_prompts,
    median,
    print_machine,
    set_threads,
    write_json,
)

LAYERS, HIDDEN, EXPERTS, TOP_K, EXPERT_INTER, HEADS, HEAD_DIM = 4, 256, 8, 2, 256, 4, 64
RANK, BATCH = 8, 32
PARAMS = ("gate_up_proj", "down_proj")  # in declaration order: down_proj's pair outermost


def build_base(folder: Path) -> Any:
    """A random Qwen3-MoE in bf16 with SmolLM2's tokenizer, saved as a local HF folder."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from loramux.core.config import DEFAULT_BASE_MODEL, Settings
    from loramux.core.models import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model(DEFAULT_BASE_MODEL, Settings().models_dir))
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        moe_intermediate_size=EXPERT_INTER,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_expert_adapter(folder: Path, seed: int) -> Path:
    """PEFT's on-disk form of a `target_parameters` adapter on every layer's experts:
    A [E * r, in], B [out, r * E] per parameter (tests/test_model_families.py checks this
    layout against adapters PEFT itself saves)."""
    shapes = {  # Qwen3-MoE: gate_up_proj [E, 2I, H] maps H -> 2I, down_proj [E, H, I] I -> H
        "gate_up_proj": (HIDDEN, 2 * EXPERT_INTER),
        "down_proj": (EXPERT_INTER, HIDDEN),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        for depth, param in enumerate(reversed(PARAMS)):
            key = f"base_model.model.model.layers.{layer}.mlp.experts" + ".base_layer" * depth
            fan_in, fan_out = shapes[param]
            tensors[f"{key}.lora_A.weight"] = torch.randn(
                EXPERTS * RANK, fan_in, generator=generator
            ).mul_(0.05)
            tensors[f"{key}.lora_B.weight"] = torch.randn(
                fan_out, RANK * EXPERTS, generator=generator
            ).mul_(0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": [],
        "target_parameters": [f"experts.{p}" for p in PARAMS],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def run_batch(
    engine: Any, prompts: list[list[int]], adapters: list[str | None], new: int
) -> dict[str, float]:
    from loramux.server.requests import GenerationRequest, SamplingParams

    started = time.perf_counter()
    streams = [
        engine.submit(
            GenerationRequest(f"r{i}-{started}", ids, SamplingParams(max_new_tokens=new), adapter)
        )
        for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True))
    ]
    tokens = 0
    for stream in streams:
        for event in stream:
            if event.error:
                raise RuntimeError(event.error)
            tokens += len(event.token_ids)
    seconds = time.perf_counter() - started
    return {"e2e_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    threads = set_threads()
    info = machine_info()
    print_machine(info)
    reps, new_tokens, prompt_len = (2, 8, 24) if args.quick else (5, 32, 32)

    from loramux.core.config import Settings
    from loramux.core.models import ResolvedModel, load_base_model
    from loramux.server.engine import Engine

    with tempfile.TemporaryDirectory(prefix="loramux-bench-moe-") as tmp:
        root = Path(tmp)
        tokenizer = build_base(root / "base")
        names = [f"experts-{i}" for i in range(BATCH)]
        resolved = ResolvedModel(name="qwen3-moe-small-random", path=root / "base", hub_id=None)
        settings = Settings(
            max_batch_size=BATCH,
            max_batch_tokens=BATCH * prompt_len,
            max_loaded_adapters=BATCH,
            max_cpu_adapters=BATCH,
            kv_cache_bytes=64 << 20,
            prefix_caching=False,  # every repetition prefills its whole prompts
        )
        engine = Engine(load_base_model(resolved, "nf4", "cpu"), tokenizer, settings, resolved)
        try:
            for i, name in enumerate(names):
                engine.adapters.register(name, write_expert_adapter(root / name, seed=i))
            prompts = make_prompts(tokenizer, BATCH, prompt_len)
            configs: dict[str, list[str | None]] = {
                "base": [None] * BATCH,
                "experts_k32": list(names),
            }
            for adapters in configs.values():  # warm-up: adapters resident, kernels built
                run_batch(engine, prompts, adapters, 2)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
            for _ in range(reps):
                for name, adapters in configs.items():
                    runs[name].append(run_batch(engine, prompts, adapters, new_tokens))
            memory = engine.adapters.memory()
        finally:
            engine.shutdown()

    rows = []
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        tps = median(r["tokens_per_s"] for r in results)
        # per repetition against the base model in that same repetition, then the median
        ratio = median(
            r["tokens_per_s"] / b["tokens_per_s"]
            for r, b in zip(results, runs["base"], strict=True)
        )
        e2e = median(r["e2e_s"] for r in results)
        summary[name] = {"tokens_per_s": tps, "e2e_s": e2e, "vs_base": ratio}
        rows.append([name, f"{tps:.1f}", f"{e2e:.2f}", f"{ratio:.2f}"])
    print(format_table(["config", "tokens/s", "e2e s", "vs base"], rows))
    print(f"# adapter memory: {memory}")
    path = write_json(
        "moe",
        {
            "machine": info,
            "threads": threads,
            "shape": {
                "layers": LAYERS, "hidden": HIDDEN, "experts": EXPERTS, "top_k": TOP_K,
                "expert_intermediate": EXPERT_INTER, "rank": RANK, "batch": BATCH,
                "new_tokens": new_tokens, "prompt_tokens": prompt_len, "repetitions": reps,
            },
            "summary": summary,
            "runs": runs,
            "adapter_memory": memory,
        },
    )  # fmt: skip
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
