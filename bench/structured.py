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

Also reported: each schema's compile time cold (first compile) and cached (a cache hit).
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
) -> float:
    """Decode tokens per second of one batch: from the moment every row has its first token
    (prefill over) to the last token; every row must make exactly `new_tokens` tokens."""
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
    return (sum(made) - len(made)) / (ended - max(firsts))


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
        for spec in specs:
            t = time.perf_counter()
            engine.grammars.compile(spec)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.grammars.compile(spec)
            cached.append(time.perf_counter() - t)
        prompts = [
            engine.render_chat([("user", f"Describe item number {i} in JSON.")])
            for i in range(args.batch)
        ]
        free: list[ConstraintSpec | None] = [None] * args.batch
        bound: list[ConstraintSpec | None] = list(specs)
        run_batch(engine, prompts, free, 4)  # warm-up
        run_batch(engine, prompts, bound, 4)
        rates: dict[str, list[float]] = {"unconstrained": [], "32 schemas": []}
        for rep in range(args.repeats):
            order = [("unconstrained", free), ("32 schemas", bound)]
            for name, rows in order if rep % 2 == 0 else order[::-1]:
                rates[name].append(run_batch(engine, prompts, rows, args.new_tokens))
    finally:
        engine.shutdown()
    base = statistics.median(rates["unconstrained"])
    table = [
        (name, statistics.median(values), statistics.median(values) / base)
        for name, values in rates.items()
    ]
    print(format_table(("batch", "tokens/s (median)", "x unconstrained"), table))
    print(
        f"compile per schema: cold median {statistics.median(cold) * 1e3:.2f} ms "
        f"(max {max(cold) * 1e3:.2f}), cached median {statistics.median(cached) * 1e6:.1f} us"
    )
    payload: dict[str, Any] = {
        "machine": info,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rates": rates,
        "compile_cold_seconds": cold,
        "compile_cached_seconds": cached,
    }
    print(f"# written {write_json('structured', payload, args.results_dir)}")
    return payload


if __name__ == "__main__":
    main()
