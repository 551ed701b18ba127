"""The benchmarks keep working against the engine and the adapter store.

Speed is not asserted (that is what the benchmarks report); what is checked is that each
benchmark drives the real engine end to end on a toy-sized random NF4 Llama and accounts
for every token it times, so an API change that breaks `make bench` fails here first.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import adapters, engine

NEW_TOKENS = engine.NEW_TOKENS


def test_engine_benchmark_times_every_token_of_every_configuration(tmp_path: Path) -> None:
    configs = "base,mux_none,mux_one,mux_k8,mux_k128,mux_ranks,peft_mixed,peft_sequential"
    payload = engine.main(
        [
            "--model",
            "llama-tiny-random",
            "--batches",
            "2",
            "--reps",
            "1",
            "--configs",
            configs,
            "--distinct-files",
            "2",
            "--results-dir",
            str(tmp_path),
        ]
    )
    seen = {m["config"] for m in payload["measurements"]}
    assert seen == set(configs.split(","))
    for m in payload["measurements"]:
        # Each row's first token comes from the prefill, the rest from decode steps.
        assert m["tokens"] == 2 * NEW_TOKENS, m["config"]
        assert m["decode_tokens"] == 2 * (NEW_TOKENS - 1), m["config"]
        assert m["decode_s"] > 0 and m["e2e_s"] >= m["decode_s"], m["config"]
    base = next(s for s in payload["summary"] if s["config"] == "base")
    assert base["e2e_vs_base"] == 1.0 and base["decode_vs_base"] == 1.0
    written = json.loads((tmp_path / "engine.json").read_text())
    assert [s["config"] for s in written["summary"]] == [s["config"] for s in payload["summary"]]
    assert len(written["measurements"]) == len(seen)
    assert (tmp_path / "engine.png").stat().st_size > 0


def test_adapter_benchmark_measures_each_tier(tmp_path: Path) -> None:
    payload = adapters.main(
        [
            "--model",
            "llama-tiny-random",
            "--ranks",
            "8",
            "--reps",
            "3",
            "--peft-reps",
            "1",
            "--results-dir",
            str(tmp_path),
        ]
    )
    counts = {s["op"].strip(): s["n"] for s in payload["summary"]}
    assert counts["loramux cold load"] == 3 and counts["request TTFT, cold adapter"] == 3
    assert counts["peft load_adapter"] == 1
    cold = payload["samples_ms"]["loramux cold load (rank 8)"]
    disk = payload["samples_ms"]["  of which disk->cpu (rank 8)"]
    # A cold load includes its disk read: the store really went back to disk every time.
    assert all(d > 0 and c >= d for c, d in zip(cold, disk, strict=True))
    assert (tmp_path / "adapters.png").stat().st_size > 0
