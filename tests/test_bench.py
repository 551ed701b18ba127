"""The benchmarks keep working against the engine and the adapter store.

Speed is not asserted (that is what the benchmarks report); what is checked is that each
benchmark drives the real engine end to end on a toy-sized random NF4 Llama and accounts
for every token it times, so an API change that breaks `make bench` fails here first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import adapters, engine, lora_kernel, structured
from loramux.server.lora.backend.native import cpu_supports_kernel

NEW_TOKENS = engine.NEW_TOKENS


def test_engine_benchmark_times_every_token_of_every_configuration(tmp_path: Path) -> None:
    configs = (
        "base,mux_none,mux_one,mux_k8,mux_k128,mux_ranks,base_bnb,mux_one_bnb,mux_k32_dora,"
        "peft_mixed,peft_sequential"
    )
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
    assert set(payload["adapter_load_ms"]) == {"plain", "dora"}  # issue 27: DoRA load time
    assert all(ms > 0 for ms in payload["adapter_load_ms"].values())


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


@pytest.mark.skipif(cpu_supports_kernel() is not None, reason="no AVX-512 BF16 CPU")
def test_lora_kernel_benchmark_checks_and_times_each_reader(tmp_path: Path) -> None:
    payload = lora_kernel.main(
        [
            "--configs",
            "one1,ranks",
            "--layers",
            "2",
            "--steps",
            "1",
            "--reps",
            "1",
            "--check",
            "--results-dir",
            str(tmp_path),
        ]
    )
    # The kernel it times computes what a float32 reference does, to bf16 rounding, on a
    # single row and on mixed rank classes.
    assert {c["config"] for c in payload["checks"]} == {"one1", "ranks"}
    assert all(c["max_rel_error"] < 1e-2 for c in payload["checks"]), payload["checks"]
    readers = {(r["config"], r["kernel"]) for r in payload["results"]}
    assert len(readers) == 6  # 2 configs x (kernel, plain read per call, one pass)
    assert all(r["step_ms_p50"] > 0 and r["weight_mb"] > 0 for r in payload["results"])
    assert json.loads((tmp_path / "lora_kernel.json").read_text())["results"]


def test_gpu_script_dry_run_compares_the_backends_on_the_cpu(tmp_path: Path) -> None:
    """`bash bench/gpu.sh --dry-run`: the GPU comparison script itself, on a tiny model with
    the Triton kernels interpreted, so the script is known to work before a GPU runs it."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", str(root / "bench" / "gpu.sh"), "--dry-run", "--results-dir", str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "dry_run_lora_backends.json").read_text())
    seen = {(r["system"], r["adapters"]) for r in payload["results"]}
    assert seen == {(s, k) for s in ("base", "triton", "eager") for k in (1, 8)}
    assert all(r["decode_tps"] > 0 for r in payload["results"])
    assert "| 8        | triton |" in done.stdout


@pytest.mark.slow
def test_structured_benchmark_times_both_batches_and_every_compile(tmp_path: Path) -> None:
    """Issue 26's bench on the default model, toy-sized: the three configurations measured
    (the constrained batch with the masks overlapped and not, with their fill time), every
    row made its tokens (run_batch asserts it), each schema compiled cold and cached."""
    payload = structured.main(
        ["--batch", "4", "--new-tokens", "4", "--repeats", "1", "--results-dir", str(tmp_path)]
    )
    assert all(len(rates) == 1 and rates[0] > 0 for rates in payload["rates"].values())
    assert len(payload["rates"]) == 3  # free, masks overlapped, masks after the forward
    fill = payload["mask_fill_seconds_per_step"]
    assert [len(v) for v in fill.values()] == [0, 1, 1] and all(
        v[0] > 0 for k, v in fill.items() if v
    )
    assert len(payload["compile_cold_seconds"]) == len(payload["compile_cached_seconds"]) == 4
    assert json.loads((tmp_path / "structured.json").read_text())["batch"] == 4
