"""Structured outputs at batch 32: every row under its own JSON schema vs. the same batch free.

    python -m bench.structured                       # batch 32, 32 new tokens, 3 repetitions
    python -m bench.structured --batch 8 --new-tokens 16 --repeats 1

Issue 26's speed target: a batch where every row has a different JSON schema decodes at
>= 0.9x the tokens/s of the same batch unconstrained. One engine in this process (the
default NF4 model); per repetition the two configurations run back to back (alternating
which goes first), so a drift of the machine's speed hits both alike. Each row's schema is
an object with one string property of its own name and a minLength no row can reach in
`--new-tokens` tokens, so constrained rows, like the free ones (ignore_eos), make exactly
`--new-tokens` tokens: the same work, masks included. Throughput is decode only: rows x
(new tokens - 1) over the time from the last row's first token (every prefill done) to the
last token.

The constrained batch runs twice per repetition: with the masks filled on the helper
thread while the forward pass runs (the default) and filled after it on the engine thread
(`--no-grammar-mask-overlap`), side by side with the free batch: decode step time, and per
step the helper's fill time and the time sampling spent on the masks (waiting for the fill,
applying), from the engine's mask counters (loramux_grammar_mask_seconds).

Also reported: each schema's compile time cold (first compile: tried in a worker process,
then compiled here), cached (a cache hit), and the same compile in this process alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, format_table, machine_info, print_machine, write_json
from loramux.core.config import Settings
from loramux.server.constraints.spec import ConstraintSpec
from loramux.server.engine import Engine
from loramux.server.requests import GenerationRequest, SamplingParams


def schemas(batch: int, new_tokens: int) -> list[ConstraintSpec]:
    return [
        ConstraintSpec.json_schema(
            {
                "type": "object",
                "properties": {f"field_{i}": {"type": "string", "minLength": 8 * new_tokens}},
                "required": [f"field_{i}"],
            },
            "bench",
        )
        for i in range(batch)
    ]


def run_batch(
    engine: Engine, prompts: list[list[int]], specs: list[ConstraintSpec | None], new_tokens: int
) -> tuple[float, float]:
    """Decode tokens per second of one batch and its decode step time (s): from the moment
    every row has its first token (prefill over) to the last token; every row must make
    exactly `new_tokens` tokens."""
    streams = []
    for i, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, constraint=spec)
        streams.append(engine.submit(GenerationRequest(f"r{i}", prompt, params)))
    firsts: list[float] = []
    made: list[int] = []

    def read(stream: Any) -> None:
        count, first = 0, 0.0
        for event in stream:
            if event.error is not None:
                raise event.error
            if not count and event.token_ids:
                first = time.perf_counter()
            count += len(event.token_ids)
        firsts.append(first)
        made.append(count)

    with concurrent.futures.ThreadPoolExecutor(len(streams)) as pool:
        for done in [pool.submit(read, stream) for stream in streams]:
            done.result()
    ended = time.perf_counter()
    assert made == [new_tokens] * len(prompts), made
    seconds = ended - max(firsts)
    return (sum(made) - len(made)) / seconds, seconds / (new_tokens - 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    info = machine_info()
    print_machine(info)
    engine = Engine.create(Settings(max_batch_size=args.batch))
    try:
        specs = schemas(args.batch, args.new_tokens)
        cold, cached = [], []
        here: list[float] = []  # the same compile in this process alone (no worker's try)
        for spec in specs:
            t = time.perf_counter()
            engine.grammars.compile(spec)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.grammars.compile(spec)
            cached.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.grammars.compile_here(spec)
            here.append(time.perf_counter() - t)
        prompts = [
            engine.render_chat([("user", f"Describe item number {i} in JSON.")])
            for i in range(args.batch)
        ]
        free: list[ConstraintSpec | None] = [None] * args.batch
        bound: list[ConstraintSpec | None] = list(specs)
        run_batch(engine, prompts, free, 4)  # warm-up
        run_batch(engine, prompts, bound, 4)
        configs: list[tuple[str, list[ConstraintSpec | None], bool]] = [
            ("unconstrained", free, True),
            (f"{args.batch} schemas, masks overlapped", bound, True),
            (f"{args.batch} schemas, masks after the forward", bound, False),
        ]
        rates: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        steps: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        fill: dict[str, list[float]] = {name: [] for name, _, _ in configs}  # s per step
        at_sampling: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        for rep in range(args.repeats):
            for name, rows, overlap in configs if rep % 2 == 0 else configs[::-1]:
                engine.masks.overlap = overlap
                before = engine.masks.snapshot()
                rate, step = run_batch(engine, prompts, rows, args.new_tokens)
                after = engine.masks.snapshot()
                rates[name].append(rate)
                steps[name].append(step)
                samplings = after.samplings - before.samplings
                if samplings:
                    fill_s = after.fill_seconds_sum - before.fill_seconds_sum
                    wait_s = after.sampling_seconds_sum - before.sampling_seconds_sum
                    fill[name].append(fill_s / samplings)
                    at_sampling[name].append(wait_s / samplings)
        engine.masks.overlap = True
    finally:
        engine.shutdown()
    base = statistics.median(rates["unconstrained"])

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:.2f}" if values else "-"

    table = [
        (
            name,
            statistics.median(rates[name]),
            statistics.median(rates[name]) / base,
            ms(steps[name]),
            ms(fill[name]),
            ms(at_sampling[name]),
        )
        for name in rates
    ]
    headers = (
        "batch",
        "tokens/s (median)",
        "x unconstrained",
        "step ms",
        "mask fill ms/step",
        "sampling on masks ms/step",
    )
    print(format_table(headers, table))
    print(
        f"compile per schema: cold median {statistics.median(cold) * 1e3:.2f} ms "
        f"(the first {cold[0] * 1e3:.0f} ms: the vocabulary read and a worker started), "
        f"cached median {statistics.median(cached) * 1e6:.1f} us; the same compile in this "
        f"process alone (no worker's try first): median {statistics.median(here) * 1e3:.2f} ms"
    )
    payload: dict[str, Any] = {
        "machine": info,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rates": rates,
        "step_seconds": steps,
        "mask_fill_seconds_per_step": fill,
        "sampling_on_masks_seconds_per_step": at_sampling,
        "compile_cold_seconds": cold,
        "compile_cached_seconds": cached,
        "compile_in_process_seconds": here,
    }
    print(f"# written {write_json('structured', payload, args.results_dir)}")
    return payload


if __name__ == "__main__":
    main()
