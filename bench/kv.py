"""The paged KV cache's targets (issue 12), each scenario in a fresh process.

    python -m bench.kv                                   # every scenario, this tree only
    python -m bench.kv --baseline-src /path/to/old/tree  # + the pre-paging engine alongside
    python -m bench.kv --quick                           # smaller sizes (a smoke run)
    python -m bench.kv --only itl --itl-baseline-src /path/to/earlier/tree
                                                         # itl, alternating with it

Scenarios (SmolLM2, NF4, CPU; each run is a process of its own, so resident memory and
thread teams start clean, and with --baseline-src the old engine's runs alternate with
this tree's in the same session):

* memory   one long prompt (4,000 and 8,000 tokens) on default settings: resident memory
           before, after and at peak (VmHWM, reset just before the request), against the
           keys and values it really holds (tokens x 2 x layers x kv_heads x head_dim x 2 B)
* decode   32 rows, 32-token prompts, 64 new tokens, base model and one adapter: decode
           tokens/s after the first token (median of 3 repetitions per process)
* itl      31 streams, then the same 31 with a 6,000-token prompt arriving mid-stream:
           the streams' inter-token latency p50 without, p99 with, and the long prompt's
           time to first token (per --max-batch-tokens, --max-prefill-tokens-while-decoding
           and --max-prefill-attention-while-decoding)
* prefix   32 requests with the same 1,000-token system prompt and adapter, submitted
           together: time to first token and prefill tokens computed, prefix cache on/off

`--src DIR` (internal) runs a worker against the loramux packages of another checkout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# ---- worker side (a fresh process per scenario) ----
def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _engine(base: Any, **settings: Any) -> Any:
    from loramux.core.config import Settings
    from loramux.server.engine import Engine

    return Engine(base.model, base.tokenizer, Settings(**settings), base.resolved)


def _timed(
    stream: Any,
    out: list[float],
    submitted: float,
    streaming: threading.Barrier | None = None,
) -> None:
    """Times each token of `stream`; passes `streaming` once it has 10 entries."""
    out.append(submitted)
    try:
        for event in stream:
            if event.error is not None:
                raise RuntimeError(str(event.error))
            if event.token_ids:
                # An event may carry several tokens (a reader that fell behind takes what
                # piled up at once): each gets the time this reader saw it.
                before = len(out)
                out.extend([time.perf_counter()] * len(event.token_ids))
                if streaming is not None and before < 10 <= len(out):
                    streaming.wait()
    except BaseException:
        if streaming is not None:
            streaming.abort()  # the waiting benchmark fails instead of hanging
        raise


def _run_streams(engine: Any, requests: list[Any]) -> list[list[float]]:
    """Submit together; per request [submit time, token times...]."""
    times: list[list[float]] = [[] for _ in requests]
    threads = []
    for request, out in zip(requests, times, strict=True):
        stream = engine.submit(request)
        thread = threading.Thread(target=_timed, args=(stream, out, time.perf_counter()))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return times


def _request(rid: str, ids: list[int], new: int, adapter: str | None = None) -> Any:
    from loramux.server.requests import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    return GenerationRequest(rid, ids, params, adapter)


def _kv_bytes_per_token(model: Any) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * 2


def worker_memory(base: Any, tokens: int) -> dict[str, Any]:
    engine = _engine(base)
    prompt = base.prompts(1, tokens)[0]
    _run_streams(engine, [_request("warm", prompt[:16], 2)])
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    _run_streams(engine, [_request("long", prompt, 4)])
    seconds = time.perf_counter() - started
    after, peak = _rss()
    stats = engine.stats()
    engine.shutdown()
    kv = tokens * _kv_bytes_per_token(base.model)
    return {
        "tokens": tokens,
        "kv_bytes": kv,
        "rss_before": before,
        "rss_after": after,
        "rss_peak": peak,
        "rss_growth": after - before,
        "peak_growth": peak - before,
        "growth_over_kv": (after - before) / kv,
        "peak_over_kv": (peak - before) / kv,
        "pool_bytes": stats.kv_cache_bytes,
        "seconds": seconds,
    }


def worker_decode(base: Any, adapter_dir: str | None, reps: int, new: int) -> dict[str, Any]:
    engine = _engine(base, max_batch_size=32, lora_kernel="eager")
    adapter = None
    if adapter_dir:
        engine.adapters.register("a", Path(adapter_dir))
        engine.adapters.load("a")
        adapter = "a"
    prompts = base.prompts(32, 32)
    rates = []
    for rep in range(reps + 1):
        times = _run_streams(
            engine, [_request(f"d{rep}-{i}", p, new, adapter) for i, p in enumerate(prompts)]
        )
        first = max(t[1] for t in times)
        last = max(t[-1] for t in times)
        if rep:  # the first repetition warms up
            rates.append(32 * (new - 1) / (last - first))
    engine.shutdown()
    rates.sort()
    return {"adapter": adapter is not None, "decode_tps": rates[len(rates) // 2], "all": rates}


def _gaps(times: list[list[float]], since: float = 0.0, until: float = float("inf")) -> list[float]:
    gaps = []
    for t in times:
        for a, b in itertools.pairwise(t[1:]):  # gaps after each stream's first token
            if since <= b <= until:
                gaps.append((b - a) * 1000)
    return gaps


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _prefill_steps(engine: Any, prompt: int, budget: int) -> int:
    """Steps the engine takes to prefill `prompt` tokens beside decoding rows."""
    tokens = min(budget, engine.prefill_tokens_while_decoding)
    area = getattr(engine, "prefill_attention_while_decoding", None)
    cached, steps = 0, 0
    while cached < prompt - 1:
        width = min(tokens, prompt - 1 - cached)
        if area:
            width = min(width, max(1, (math.isqrt(cached * cached + 4 * area) - cached) // 2))
        cached, steps = cached + width, steps + 1
    return steps


def worker_itl(
    base: Any,
    max_batch_tokens: int,
    long_tokens: int,
    prefill_while_decoding: int = 0,
    prefill_attention: int = 0,
) -> dict[str, Any]:
    engine = _engine(
        base,
        max_batch_size=32,
        max_batch_tokens=max_batch_tokens,
        max_prefill_tokens_while_decoding=prefill_while_decoding,
        max_prefill_attention_while_decoding=prefill_attention,
    )
    prompts = base.prompts(31, 32)
    long_prompt = base.prompts(1, long_tokens)[0]
    # The streams must outlast the long prompt's prefill: count its steps beside them.
    steps = _prefill_steps(engine, long_tokens, max(1, max_batch_tokens - 31))
    new = steps + 40
    quiet = _run_streams(engine, [_request(f"q{i}", p, 40) for i, p in enumerate(prompts)])
    quiet_gaps = _gaps(quiet)
    times: list[list[float]] = [[] for _ in prompts]
    threads = []
    streaming = threading.Barrier(len(prompts) + 1)  # every stream has 10 entries, and us
    streams = [engine.submit(_request(f"s{i}", p, new)) for i, p in enumerate(prompts)]
    for stream, out in zip(streams, times, strict=True):
        args = (stream, out, time.perf_counter(), streaming)
        threads.append(threading.Thread(target=_timed, args=args))
        threads[-1].start()
    streaming.wait(timeout=600)
    long_times = _run_streams(engine, [_request("long", long_prompt, 2)])[0]
    for thread in threads:
        thread.join()
    engine.shutdown()
    arrival, long_first = long_times[0], long_times[1]
    during = _gaps(times, arrival, long_first)
    return {
        "max_batch_tokens": max_batch_tokens,
        "prefill_while_decoding": engine.prefill_tokens_while_decoding,
        "prefill_attention_while_decoding": getattr(
            engine, "prefill_attention_while_decoding", None
        ),
        "long_tokens": long_tokens,
        "p50_without_ms": _pct(quiet_gaps, 50),
        "p99_without_ms": _pct(quiet_gaps, 99),
        "p50_during_ms": _pct(during, 50),
        "p99_during_ms": _pct(during, 99),
        "max_during_ms": max(during),
        "p99_over_p50": _pct(during, 99) / _pct(quiet_gaps, 50),
        "long_ttft_s": long_first - arrival,
        "gaps_during": len(during),
    }


def worker_prefix(
    base: Any, adapter_dir: str, caching: bool, requests: int, tokens: int
) -> dict[str, Any]:
    settings: dict[str, Any] = {"max_batch_size": 32, "lora_kernel": "eager"}
    if caching is False:
        settings["prefix_caching"] = False
    engine = _engine(base, **settings)
    engine.adapters.register("a", Path(adapter_dir))
    engine.adapters.load("a")
    system = base.prompts(1, tokens)[0]
    users = base.prompts(requests, 16)
    before = engine.stats()
    times = _run_streams(
        engine, [_request(f"p{i}", system + u, 1, "a") for i, u in enumerate(users)]
    )
    after = engine.stats()
    engine.shutdown()
    ttft = sorted(t[1] - t[0] for t in times)
    return {
        "prefix_caching": caching,
        "requests": requests,
        "prompt_tokens": sum(len(system) + len(u) for u in users),
        "prefill_tokens": after.prefill_tokens_total - before.prefill_tokens_total,
        "prefix_hit_tokens": after.prefix_hit_tokens - before.prefix_hit_tokens,
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_max_s": ttft[-1],
        "ttft_mean_s": sum(ttft) / len(ttft),
    }


def worker(args: argparse.Namespace) -> None:
    if args.src:
        sys.path[:0] = [str(Path(args.src) / "server"), str(Path(args.src) / "core")]
    from bench.common import load_model, set_threads

    set_threads()
    base = load_model("smollm2", "cpu")
    spec = json.loads(args.worker)
    kind = spec.pop("kind")
    result = globals()[f"worker_{kind}"](base, **spec)
    Path(args.out).write_text(json.dumps(result))


# ---- driver ----
def run_worker(spec: dict[str, Any], src: str | None, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "bench.kv", "--worker", json.dumps(spec), "--out", out]
    if src:
        cmd += ["--src", src]
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], **spec}
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", help="checkout of the engine to compare with")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=["memory", "decode", "itl", "prefix"])
    parser.add_argument("--itl-batch-tokens", type=int, nargs="*", default=[2048])
    parser.add_argument(
        "--itl-prefill-tokens",
        type=int,
        nargs="*",
        default=[0, 2048],
        help="--max-prefill-tokens-while-decoding values for the itl scenario (0: auto)",
    )
    parser.add_argument(
        "--itl-prefill-attention",
        type=int,
        nargs="*",
        default=[0],
        help="--max-prefill-attention-while-decoding values for the itl scenario (0: auto)",
    )
    parser.add_argument(
        "--itl-baseline-src",
        help="checkout of an earlier engine whose itl runs alternate with this one's",
    )
    parser.add_argument("--memory-tokens", type=int, nargs="*", default=[4000, 8000])
    parser.add_argument("--long-tokens", type=int, default=6000, help="the itl long prompt")
    parser.add_argument("--prefix-requests", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--decode-rounds", type=int, default=2)
    parser.add_argument("--decode-new", type=int, default=64)
    parser.add_argument(
        "--decode-adapter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also decode with every row on one adapter",
    )
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    from bench.common import machine_info, print_machine, write_json

    info = machine_info()
    print_machine(info)
    systems: list[tuple[str, str | None]] = [("paged", None)]
    if args.baseline_src:
        systems.insert(0, ("baseline", args.baseline_src))
    results: dict[str, Any] = {"machine": info, "runs": []}
    tmp = Path(tempfile.mkdtemp())
    adapter = str(_adapter(tmp))
    timeout = 3600.0

    def record(name: str, spec: dict[str, Any], src: str | None) -> None:
        result = run_worker(dict(spec), src, timeout)
        result["system"] = name
        print(json.dumps(result), flush=True)
        results["runs"].append(result)

    if args.quick:
        args.memory_tokens, args.long_tokens, args.prefix_requests = [1000, 2000], 1500, 8
        args.decode_rounds, args.decode_new = 1, 16
    if "memory" in args.only:
        for i, tokens in enumerate(args.memory_tokens):
            for name, src in systems if i == 0 else systems[-1:]:
                record(name, {"kind": "memory", "tokens": tokens}, src)
    if "decode" in args.only:
        for _ in range(args.decode_rounds):
            for adapter_dir in (None, adapter) if args.decode_adapter else (None,):
                for name, src in systems:
                    spec = {
                        "kind": "decode",
                        "adapter_dir": adapter_dir,
                        "reps": 3,
                        "new": args.decode_new,
                    }
                    record(name, spec, src)
    if "itl" in args.only:
        for tokens, prefill, attention in itertools.product(
            args.itl_batch_tokens, args.itl_prefill_tokens, args.itl_prefill_attention
        ):
            spec = {
                "kind": "itl",
                "max_batch_tokens": tokens,
                "prefill_while_decoding": prefill,
                "prefill_attention": attention,
                "long_tokens": args.long_tokens,
            }
            if args.itl_baseline_src:
                record("itl-baseline", spec, args.itl_baseline_src)
            record("paged", spec, None)
    if "prefix" in args.only:
        for caching in (False, True):
            spec = {
                "kind": "prefix",
                "adapter_dir": adapter,
                "caching": caching,
                "requests": args.prefix_requests,
                "tokens": args.prefix_tokens,
            }
            record("paged", spec, None)
    path = write_json("kv", results, args.results_dir)
    print(f"wrote {path}")


def _adapter(root: Path) -> Path:
    """One rank-16 all-linear adapter for SmolLM2 (written without loading the model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.common import write_adapters
    from loramux.core.config import Settings
    from loramux.core.models import resolve_base_model
    from loramux.server.lora import base_linear_shapes

    resolved = resolve_base_model("smollm2-135m-instruct", Settings().models_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(resolved.path)))
    return write_adapters(root, base_linear_shapes(skeleton), [16], "kv")["kv0"]


if __name__ == "__main__":
    main()
