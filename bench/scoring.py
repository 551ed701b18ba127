"""Prompt scoring and the prefix cache: what recomputing a cached context costs.

    python -m bench.scoring                     # 8 contexts x 4 choices, 256-token contexts
    python -m bench.scoring --context 512 --choices 8 --rounds 5

lm-eval scores a multiple-choice question by sending the context plus each answer with
`echo: true, logprobs: 1, max_tokens: 0`: K requests that share the context and differ in
their last few tokens. The engine scores a prompt by running every position (a prefix-cache
hit has no logits for the positions it skips), so each of the K requests prefills the
whole context again (docs/engine.md, "Logprobs and prompt scoring"). Storing each cached
block's logprobs beside its keys and values would let the K - 1 later requests skip it.

This measures that choice, side by side in one engine, rounds interleaved:

* score       the K requests with prompt_logprobs=1, max_new_tokens=0: what runs today
* cached      the same requests without scoring (max_new_tokens=1): the context comes from
              the prefix cache for all but the first choice. This is the compute a logprob
              store would leave (it would add the lookups, and a stored block per top-k)

Every round uses contexts never sent before (a unique first block), so the first choice
of each context always computes it. Reported: wall time per question (the K requests
submitted together, as lm-eval's batches do), prompt tokens prefilled per question (from
the engine's prefix-hit counter), and the bytes a store would add per cached token at
top-1 and top-20 beside the KV bytes per token.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS_DIR,
    format_table,
    load_model,
    machine_info,
    median,
    print_machine,
    write_json,
)

MODES = ("score", "cached")


def questions(tokenizer: Any, count: int, context: int, choices: int, seed: int) -> list:
    """`count` questions: a context of `context` ids whose first 8 are seeded random (so no
    two questions, in any round, share a cached block) and `choices` 4-token answers."""
    from bench.common import make_prompts

    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    windows = make_prompts(tokenizer, count, context + 4 * choices)
    out = []
    for window in windows:
        head = torch.randint(100, vocab, (8,), generator=generator).tolist()
        ctx = head + window[8:context]
        answers = [window[context + 4 * j : context + 4 * (j + 1)] for j in range(choices)]
        out.append((ctx, answers))
    return out


def run_round(engine: Any, mode: str, tag: str, qs: list) -> dict[str, float]:
    from loramux.server.requests import GenerationRequest, SamplingParams

    if mode == "score":
        params = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
    else:
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    hits_before = engine.stats().prefix_hit_tokens
    start = time.perf_counter()
    streams = [
        engine.submit(GenerationRequest(f"{tag}-{q}-{j}", ctx + answer, params, None))
        for q, (ctx, answers) in enumerate(qs)
        for j, answer in enumerate(answers)
    ]
    for stream in streams:
        for event in stream:
            if event.error is not None:
                raise RuntimeError(f"{mode}: {event.error}")
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(ctx) + len(a) for ctx, answers in qs for a in answers)
    hits = engine.stats().prefix_hit_tokens - hits_before
    return {
        "seconds_per_question": seconds / len(qs),
        "prefilled_per_question": (prompt_tokens - hits) / len(qs),
    }


def kv_bytes_per_token(model: Any) -> int:
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_hidden_layers) * 2 * int(heads) * int(head_dim) * 2  # bf16 K and V


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=8, help="questions per round")
    parser.add_argument("--choices", type=int, default=4, help="answers per question")
    parser.add_argument("--context", type=int, default=256, help="context tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    from loramux.core.config import Settings
    from loramux.server.engine import Engine

    info = machine_info()
    print_machine(info)
    base = load_model("smollm2", "cpu")
    settings = Settings(device="cpu", max_batch_size=64, prefix_caching=True)
    engine = Engine(base.fresh_copy(), base.tokenizer, settings, base.resolved, enable_lora=False)
    engine.warm_up()
    rounds = args.rounds + 1  # the first is a warm-up, dropped
    qs = questions(
        base.tokenizer, rounds * len(MODES) * args.questions, args.context, args.choices, 0
    )
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        for r in range(rounds):
            for m, mode in enumerate(MODES if r % 2 == 0 else MODES[::-1]):
                first = (r * len(MODES) + m) * args.questions
                result = run_round(engine, mode, f"r{r}{mode}", qs[first : first + args.questions])
                if r > 0:
                    results[mode].append(result)
    finally:
        engine.shutdown()

    summary = {
        mode: {
            "seconds_per_question": median(x["seconds_per_question"] for x in rows),
            "prefilled_per_question": median(x["prefilled_per_question"] for x in rows),
        }
        for mode, rows in results.items()
    }
    ratio = summary["score"]["seconds_per_question"] / summary["cached"]["seconds_per_question"]
    kv = kv_bytes_per_token(base.model)
    store = {k: (1 + k) * 8 for k in (1, 20)}  # float32 logprob + int32 id per entry
    print(
        format_table(
            ["mode", "s / question", "tokens prefilled / question"],
            [
                [mode, f"{s['seconds_per_question']:.3f}", f"{s['prefilled_per_question']:.0f}"]
                for mode, s in summary.items()
            ],
        )
    )
    print(f"score / cached time: {ratio:.2f}x")
    print(
        f"KV bytes per token {kv}; a logprob store per cached token: "
        f"{store[1]} bytes at top-1, {store[20]} at top-20"
    )
    payload = {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "summary": summary,
        "score_over_cached": ratio,
        "kv_bytes_per_token": kv,
        "store_bytes_per_token": store,
    }
    write_json("scoring", payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
