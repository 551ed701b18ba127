"""Decode throughput and per-step latency through the engine, against PEFT and the base model.

    python -m bench.engine                      # the full CPU run (SmolLM2, NF4)
    python -m bench.engine --quick              # batch 8 only, fewer configurations
    python -m bench.engine --model llama3-8b-random --device cuda   # see bench/gpu.sh

Configurations (on the CPU each system runs in a process of its own, as a server would,
on its own copy of the same NF4 base model, fed the same prompts; repetitions run
round-robin over configurations and batch sizes so that a slow spell on this shared
machine hits all of them alike; `--isolation in-process` keeps them in this process, as
the GPU run does):

* base            the engine with enable_lora=False: the bare base model, no wrappers
* hf_base         transformers `generate` on the bare model (reference only)
* mux_none        LoRAMux, adapters loaded but none named in the batch (wrapper cost)
* mux_one         every row on one rank-16 adapter
* mux_k8/k32      rows spread over 8 / 32 distinct rank-16 all-linear adapters
* mux_k128        128 adapters through 32 device slots: every repetition uses the next
                  block of adapters, so slots are evicted and refilled from CPU memory
* mux_ranks       32 adapters of ranks 8/16/32/64 (each in its own rank class stack)
* mux_k32_int8    mux_k32 with int8 adapter slots (`--lora-slot-dtype int8`)
* mux_k32_dora    mux_k32 with 32 DoRA adapters of rank 16 (issue 27: >= 0.95x mux_k32);
                  the run also reports each adapter's disk -> CPU load time, DoRA's norm
                  computation included, beside a plain adapter's (`dora_load`)
* *_compiled      mux_one / mux_k32 / mux_k128 / mux_ranks on the torch.compile'd kernel
                  (`--lora-kernel compiled`), side by side with the default (auto: the
                  hand-written AVX-512 BF16 kernel where it runs)
* base_bnb, mux_one_bnb, mux_k32_bnb
                  base / mux_one / mux_k32 with the 4-bit layers computed by bitsandbytes
                  (`--nf4-kernel bnb`), side by side with the default (auto: the native
                  NF4 kernel where it runs, server/loramux/server/nf4/)
* peft_mixed      PEFT, the same 32 adapters, `generate(adapter_names=[...])`
* peft_sequential PEFT, one adapter at a time: `set_adapter` + `generate` per group of rows

Timing: `e2e` is submit-to-last-token wall time for the whole batch (prefill included;
the engines run without the prefix cache, so every repetition prefills its whole prompts).
`decode` counts only tokens after each row's first: the engine's model passes are timed by
wrapping `runner.prefill`/`runner.decode`, PEFT/HF steps by a logits processor, and a
decode step's time is the gap between consecutive pass ends (forward, sampling and
bookkeeping: one token per row). Ratios are per repetition against `base` in the same
repetition, then the median over repetitions.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    MODEL_CHOICES,
    RESULTS_DIR,
    BaseModel,
    cuda_sync,
    format_table,
    load_model,
    machine_info,
    median,
    plot_path,
    print_machine,
    pyplot,
    set_threads,
    write_adapters,
    write_json,
)

ALL_CONFIGS = (
    "base",
    "hf_base",
    "mux_none",
    "mux_one",
    "mux_k8",
    "mux_k32",
    "mux_k128",
    "mux_ranks",
    "mux_k32_int8",
    "mux_k32_dora",
    "mux_one_compiled",
    "mux_k32_compiled",
    "mux_k128_compiled",
    "mux_ranks_compiled",
    "base_bnb",
    "mux_one_bnb",
    "mux_k32_bnb",
    "peft_mixed",
    "peft_sequential",
)
QUICK_CONFIGS = ("base", "mux_none", "mux_one", "mux_k8", "mux_k32", "peft_mixed")
MIXED_RANKS = (8, 16, 32, 64)
NEW_TOKENS = 24


@dataclass
class Measurement:
    """One repetition of one configuration at one batch size."""

    config: str
    batch: int
    rep: int
    e2e_s: float
    tokens: int  # all generated tokens
    prefill_s: float  # start until every row has its first token's logits
    decode_s: float  # sum of decode-step gaps
    decode_tokens: int
    step_ms: list[float] = field(default_factory=list)  # per decode step
    forward_s: float = float("nan")  # engine only: time inside runner.decode itself

    @property
    def e2e_tps(self) -> float:
        return self.tokens / self.e2e_s

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


# ---- timing hooks ----
class PassRecorder:
    """Wraps an engine's runner passes to record (kind, start, end, decode rows or prompts).

    A mixed pass (decode rows with prefill chunks beside them) counts as a decode step of
    its decode rows: its time is what those rows waited for their token.
    """

    def __init__(self, runner: Any, device: torch.device) -> None:
        self.events: list[tuple[str, float, float, int]] = []
        self.device = device
        self._lock = threading.Lock()
        runner.prefill = self._wrap("prefill", runner.prefill, lambda b: len(b.prompts))
        runner.decode = self._wrap("decode", runner.decode, lambda b: len(b.tokens))
        runner.mixed = self._wrap("decode", runner.mixed, lambda b, _: len(b.tokens))

    def _wrap(
        self, kind: str, inner: Callable[..., Any], rows: Callable[..., int]
    ) -> Callable[..., Any]:
        def timed(*batch: Any) -> Any:
            start = time.perf_counter()
            out = inner(*batch)
            cuda_sync(self.device)
            end = time.perf_counter()
            with self._lock:
                self.events.append((kind, start, end, rows(*batch)))
            return out

        return timed

    def take(self) -> list[tuple[str, float, float, int]]:
        with self._lock:
            events, self.events = self.events, []
        return events


def split_engine_events(
    events: list[tuple[str, float, float, int]], start: float
) -> tuple[float, float, int, list[float], float]:
    """(prefill_s, decode_s, decode_tokens, step_ms, forward_s) from one batch's passes."""
    events = sorted(events, key=lambda e: e[2])
    prefill_end = max((e[2] for e in events if e[0] == "prefill"), default=start)
    decode_s, tokens, steps, forward = 0.0, 0, [], 0.0
    previous_end = None
    for kind, begin, end, rows in events:
        if kind == "decode" and previous_end is not None:
            gap = end - previous_end
            decode_s += gap
            tokens += rows
            steps.append(gap * 1000)
            forward += end - begin
        previous_end = end
    return prefill_end - start, decode_s, tokens, steps, forward


class StepClock:
    """A transformers logits processor that only notes when each generation step ends."""

    def __init__(self, device: torch.device) -> None:
        self.times: list[float] = []
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cuda_sync(self.device)
        self.times.append(time.perf_counter())
        return scores


# ---- the systems under test ----
class EngineSystem:
    """One LoRAMux Engine (bare or with adapters) on its own copy of the base model."""

    def __init__(
        self,
        base: BaseModel,
        *,
        enable_lora: bool,
        slots: int,
        max_batch: int,
        adapters: dict[str, Path] | None = None,
        slot_dtype: str = "bf16",
        lora_kernel: str = "auto",
        nf4_kernel: str = "auto",
        attention_kernel: str = "auto",
        max_cpu_adapters: int = 256,
    ) -> None:
        from loramux.core.config import Settings
        from loramux.server.engine import Engine

        settings = Settings(
            device=str(base.device),
            max_batch_size=max_batch,
            max_loaded_adapters=slots,
            max_cpu_adapters=max(max_cpu_adapters, slots),
            max_batch_tokens=max(2048, max_batch * 160),
            lora_slot_dtype=slot_dtype,
            lora_kernel=lora_kernel,
            nf4_kernel=nf4_kernel,
            attention_kernel=attention_kernel,
            # Every repetition sends the same prompts: with the prefix cache on, a system
            # that repeats its adapters (base, mux_k32) would prefill only the tokens past
            # the cached blocks, and mux_k128 (a new adapter set, so new cache keys, each
            # repetition) all of them. The prefix cache is measured by bench.kv.
            prefix_caching=False,
        )
        self.engine = Engine(
            base.fresh_copy(), base.tokenizer, settings, base.resolved, enable_lora=enable_lora
        )
        self.engine.warm_up()
        self.recorder = PassRecorder(self.engine.runner, base.device)
        for adapter_id, folder in (adapters or {}).items():
            self.engine.adapters.register(adapter_id, folder)

    def preload(self, adapter_ids: Sequence[str]) -> None:
        """Disk -> CPU -> slot for each (later ones evict earlier ones beyond the slots)."""
        for adapter_id in adapter_ids:
            self.engine.adapters.load(adapter_id)

    def run(
        self,
        config: str,
        batch: int,
        rep: int,
        prompts: list[list[int]],
        rows: list[str | None],
        new_tokens: int = NEW_TOKENS,
    ) -> Measurement:
        from loramux.server.requests import GenerationRequest, SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        self.recorder.take()
        start = time.perf_counter()
        streams = [
            self.engine.submit(GenerationRequest(f"{config}-{rep}-{i}", prompts[i], params, row))
            for i, row in enumerate(rows)
        ]
        tokens = 0
        for stream in streams:
            for event in stream:
                if event.error is not None:
                    raise RuntimeError(f"{config}: {event.error}")
                tokens += len(event.token_ids)
        e2e = time.perf_counter() - start
        prefill, decode, decode_tokens, steps, forward = split_engine_events(
            self.recorder.take(), start
        )
        return Measurement(
            config, batch, rep, e2e, tokens, prefill, decode, decode_tokens, steps, forward
        )

    def shutdown(self) -> None:
        self.engine.shutdown()


class HFSystem:
    """transformers `generate` on a plain model, or PEFT with many adapters loaded."""

    def __init__(self, base: BaseModel, adapters: dict[str, Path] | None = None) -> None:
        self.device = base.device
        self.pad = base.tokenizer.pad_token_id
        if adapters:
            from peft import PeftModel

            names = list(adapters)
            self.model: Any = PeftModel.from_pretrained(
                base.fresh_copy(), str(adapters[names[0]]), adapter_name=names[0]
            )
            for name in names[1:]:
                self.model.load_adapter(str(adapters[name]), adapter_name=name)
        else:
            self.model = base.model  # generate() never modifies it
        self.model.eval()

    def _generate(
        self, prompts: list[list[int]], adapter_names: list[str] | None
    ) -> tuple[int, list[float]]:
        clock = StepClock(self.device)
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        extra: dict[str, Any] = {"adapter_names": adapter_names} if adapter_names else {}
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,  # as ignore_eos: every row makes every token
                do_sample=False,
                pad_token_id=self.pad,
                logits_processor=[clock],
                **extra,
            )
        return int(out.shape[0] * (out.shape[1] - ids.shape[1])), clock.times

    def run(
        self,
        config: str,
        batch: int,
        rep: int,
        prompts: list[list[int]],
        rows: list[str | None],
        sequential: bool = False,
    ) -> Measurement:
        if sequential:  # one generate per adapter: the rows of each group together
            groups: dict[str | None, list[int]] = {}
            for i, row in enumerate(rows):
                groups.setdefault(row, []).append(i)
            plan = [(name, [prompts[i] for i in members]) for name, members in groups.items()]
        else:
            mixed = None if all(r is None for r in rows) else [r or "__base__" for r in rows]
            plan = [(mixed, prompts)]  # type: ignore[list-item]
        start = time.perf_counter()
        tokens, prefill, decode, decode_tokens, steps = 0, 0.0, 0.0, 0, []
        for names, group_prompts in plan:
            group_start = time.perf_counter()
            if sequential:
                self.model.set_adapter(names)
                made, times = self._generate(group_prompts, None)
            else:
                made, times = self._generate(group_prompts, names)  # type: ignore[arg-type]
            tokens += made
            prefill += times[0] - group_start
            gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
            steps += gaps
            decode += sum(gaps) / 1000
            decode_tokens += len(gaps) * len(group_prompts)
        e2e = time.perf_counter() - start
        return Measurement(config, batch, rep, e2e, tokens, prefill, decode, decode_tokens, steps)


@dataclass
class SystemSpec:
    """One system under test, built where it runs (this process or its own)."""

    kind: str  # "engine" (LoRAMux, lora on unless enable_lora=False) or "hf" (transformers/PEFT)
    enable_lora: bool = True
    adapters: dict[str, Path] = field(default_factory=dict)  # engine: all preloaded
    slot_dtype: str = "bf16"  # engine: --lora-slot-dtype
    lora_kernel: str = "auto"  # engine: --lora-kernel
    nf4_kernel: str = "auto"  # engine: --nf4-kernel


class LocalSystem:
    """A system in this process."""

    def __init__(
        self, spec: SystemSpec, base: BaseModel, max_batch: int, prompts: list[list[int]]
    ) -> None:
        started = time.perf_counter()
        self.prompts = prompts
        self.system: EngineSystem | HFSystem
        if spec.kind == "engine":
            engine = EngineSystem(
                base,
                enable_lora=spec.enable_lora,
                slots=32,
                max_batch=max_batch,
                adapters=spec.adapters,
                slot_dtype=spec.slot_dtype,
                lora_kernel=spec.lora_kernel,
                nf4_kernel=spec.nf4_kernel,
            )
            engine.preload(list(spec.adapters))
            self.system = engine
        else:
            self.system = HFSystem(base, spec.adapters or None)
        self.setup_s = time.perf_counter() - started

    def run(self, config: str, batch: int, rep: int, rows: list[str | None]) -> Measurement:
        if isinstance(self.system, EngineSystem):
            return self.system.run(config, batch, rep, self.prompts[:batch], rows)
        sequential = config == "peft_sequential"
        return self.system.run(config, batch, rep, self.prompts[:batch], rows, sequential)

    def close(self) -> dict[str, Any]:
        if isinstance(self.system, EngineSystem):
            self.system.shutdown()
        return dynamo_counters()


@dataclass
class Launch:
    """What a system's own process needs to build it (picklable: sent to the child)."""

    spec: SystemSpec
    model: str
    device: str
    max_batch: int
    prompt_tokens: int


def _system_process(conn: Any, launch: Launch) -> None:
    """A system's own process: build it, then run what the parent asks until told to stop."""
    try:
        set_threads()
        base = load_model(launch.model, launch.device)
        prompts = base.prompts(launch.max_batch, launch.prompt_tokens)
        system = LocalSystem(launch.spec, base, launch.max_batch, prompts)
        conn.send(("ready", system.setup_s))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while (job := conn.recv()) is not None:
        try:
            conn.send(("ok", asdict(system.run(*job))))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    conn.send(("closed", system.close()))


class SystemProcess:
    """A system in a process of its own.

    Why: on the CPU, every thread that runs parallel torch ops keeps an OpenMP team for
    life, and with more OpenMP threads than CPUs in one process libgomp nearly stops
    spin-waiting, which slows every pass that interleaves small ops (the LoRA ones) with
    large ones (see loramux.server.threads). A server process has one engine thread; so
    here each system gets a process, and the processes that are not being measured sleep.
    """

    def __init__(self, name: str, launch: Launch) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_system_process, args=(child, launch), name=f"bench-{name}", daemon=True
        )
        self.process.start()
        child.close()
        self.setup_s = float("nan")

    def _receive(self, expected: str) -> Any:
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"system {self.name}: its process died") from None
        if kind == "error":
            raise RuntimeError(f"system {self.name} failed:\n{value}")
        assert kind == expected, (kind, expected)
        return value

    def wait_ready(self) -> None:
        self.setup_s = self._receive("ready")

    def run(self, config: str, batch: int, rep: int, rows: list[str | None]) -> Measurement:
        self.conn.send((config, batch, rep, rows))
        return Measurement(**self._receive("ok"))

    def close(self) -> dict[str, Any]:
        self.conn.send(None)
        counters: dict[str, Any] = self._receive("closed")
        self.process.join(60)
        return counters


def row_adapters(config: str, batch: int, rep: int) -> list[str | None]:
    """Which adapter each row names; blocks of K rotate across repetitions."""
    pools = {
        "mux_k8": ("a", 8),
        "mux_k32": ("a", 32),
        "mux_k32_int8": ("a", 32),
        "mux_k32_dora": ("d", 32),
        "mux_k32_compiled": ("a", 32),
        "mux_k32_bnb": ("a", 32),
        "mux_ranks_compiled": ("r", 32),
        "peft_mixed": ("a", 32),
        "peft_sequential": ("a", 32),
        "mux_k128": ("c", 128),
        "mux_k128_compiled": ("c", 128),
        "mux_ranks": ("r", 32),
    }
    if config in ("base", "base_bnb", "hf_base", "mux_none"):
        return [None] * batch
    if config in ("mux_one", "mux_one_compiled", "mux_one_bnb"):
        return ["a0"] * batch
    prefix, k = pools[config]
    return [f"{prefix}{(rep * batch + i) % k}" for i in range(batch)]


def load_times(
    base: BaseModel, plain: dict[str, Path], dora: dict[str, Path], count: int = 8
) -> dict[str, float]:
    """Median ms to read an adapter into CPU memory as the store's loader does
    (`inspect_adapter`, then DoRA's g from the base weights), plain and DoRA, rank 16."""
    from loramux.server.adapters import inspect_adapter
    from loramux.server.lora.dora import dora_scales
    from loramux.server.threads import in_own_thread

    linears = base.linear_shapes()
    bases = {name: base.model.get_submodule(name) for name in linears}

    def load(folder: Path) -> float:
        started = time.perf_counter()
        dora_scales(inspect_adapter(folder, linears, 64), bases)
        return 1000 * (time.perf_counter() - started)

    def measure() -> dict[str, float]:
        return {
            kind: median([load(folder) for folder in list(folders.values())[:count]])
            for kind, folders in (("plain", plain), ("dora", dora))
        }

    return in_own_thread(measure, "load-times")


def summarise(measurements: list[Measurement]) -> list[dict[str, Any]]:
    base = {(m.batch, m.rep): m for m in measurements if m.config == "base"}
    keys = sorted({(m.config, m.batch) for m in measurements}, key=lambda k: (k[1], k[0]))
    order = {c: i for i, c in enumerate(ALL_CONFIGS)}
    keys.sort(key=lambda k: (k[1], order.get(k[0], 99)))
    summary = []
    for config, batch in keys:
        runs = [m for m in measurements if m.config == config and m.batch == batch]
        paired = [(m, base[(batch, m.rep)]) for m in runs if (batch, m.rep) in base]
        steps = [s for m in runs for s in m.step_ms]
        summary.append(
            {
                "config": config,
                "batch": batch,
                "reps": len(runs),
                "e2e_tokens_per_s": median(m.e2e_tps for m in runs),
                "decode_tokens_per_s": median(m.decode_tps for m in runs),
                "step_ms_p50": median(steps),
                "prefill_ms": median(m.prefill_s * 1000 for m in runs),
                "forward_share": median(
                    m.forward_s / m.decode_s for m in runs if m.forward_s == m.forward_s
                ),
                "e2e_vs_base": median(m.e2e_tps / b.e2e_tps for m, b in paired),
                "decode_vs_base": median(m.decode_tps / b.decode_tps for m, b in paired),
            }
        )
    return summary


def print_summary(summary: list[dict[str, Any]]) -> str:
    headers = [
        "config",
        "batch",
        "e2e tok/s",
        "decode tok/s",
        "step ms p50",
        "prefill ms",
        "e2e x base",
        "decode x base",
        "reps",
    ]
    rows = [
        [
            s["config"],
            s["batch"],
            s["e2e_tokens_per_s"],
            s["decode_tokens_per_s"],
            s["step_ms_p50"],
            s["prefill_ms"],
            s["e2e_vs_base"],
            s["decode_vs_base"],
            s["reps"],
        ]
        for s in summary
    ]
    table = format_table(headers, rows)
    print(table, flush=True)
    return table


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    batches = sorted({s["batch"] for s in summary})
    configs = [c for c in ALL_CONFIGS if any(s["config"] == c for s in summary)]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        by_config = {s["config"]: s for s in summary if s["batch"] == batch}
        values = [by_config.get(c, {}).get("decode_tokens_per_s", 0.0) for c in configs]
        bars = ax.bar(range(len(configs)), values, color="tab:blue")
        for bar, c in zip(bars, configs, strict=True):
            ratio = by_config.get(c, {}).get("decode_vs_base", float("nan"))
            if ratio == ratio:
                ax.annotate(
                    f"{ratio:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("decode tokens/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dynamo_counters() -> dict[str, Any]:
    """How often torch.compile compiled the LoRA kernel (a fallback to eager would show)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {group: dict(values) for group, values in counters.items() if values}


def _plan_kernels(
    need: set[str],
    specs: dict[str, SystemSpec],
    serves: dict[str, str],
    config: str,
    system: str,
    adapters: dict[str, Path],
) -> None:
    """`config` on the default LoRA kernel and `config`_compiled on the compiled one, as asked."""
    for suffix, kernel in (("", "auto"), ("_compiled", "compiled")):
        if config + suffix in need:
            specs[system + suffix] = SystemSpec("engine", adapters=adapters, lora_kernel=kernel)
            serves[config + suffix] = system + suffix


def main(argv: Sequence[str] | None = None, base: BaseModel | None = None) -> dict[str, Any]:
    """Run the benchmark; `base` lets a caller share one loaded model between benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting repetitions once this many seconds have passed (0: no limit)",
    )
    parser.add_argument(
        "--distinct-files",
        type=int,
        default=0,
        help="write N distinct adapter files, hard-link the rest (big models)",
    )
    parser.add_argument(
        "--isolation",
        choices=("auto", "process", "in-process"),
        default="auto",
        help="run each system in its own process (auto: on the CPU, unless a model is passed in)",
    )
    parser.add_argument("--quick", action="store_true", help="batch 8, fewer configs, 2 reps")
    parser.add_argument("--out", default="engine", help="results file name (no suffix)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.configs, args.reps = "8", ",".join(QUICK_CONFIGS), 2
    batches = [int(b) for b in args.batches.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(ALL_CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}")
    if "base" not in configs:
        configs.insert(0, "base")

    set_threads()
    info = machine_info()
    print_machine(info)
    started = time.perf_counter()
    own_base = base is None
    if base is None:
        base = load_model(args.model, args.device)
        print(f"# model {args.model} loaded in {time.perf_counter() - started:.0f}s", flush=True)
    max_batch = max(batches)
    linears = base.linear_shapes()
    prompts = base.prompts(max_batch, args.prompt_tokens)

    with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
        root = Path(tmp)
        need = set(configs)
        adapters_a = write_adapters(
            root, linears, [16] * 32, "a", distinct_files=args.distinct_files
        )
        specs: dict[str, SystemSpec] = {"bare": SystemSpec("engine", enable_lora=False)}
        serves = {"base": "bare"}  # config -> the system that runs it
        if need & {"mux_none", "mux_one", "mux_k8", "mux_k32"}:
            specs["mux"] = SystemSpec("engine", adapters=adapters_a)
            serves.update(dict.fromkeys(("mux_none", "mux_one", "mux_k8", "mux_k32"), "mux"))
        if "base_bnb" in need:
            specs["bare_bnb"] = SystemSpec("engine", enable_lora=False, nf4_kernel="bnb")
            serves["base_bnb"] = "bare_bnb"
        if need & {"mux_one_bnb", "mux_k32_bnb"}:
            specs["mux_bnb"] = SystemSpec("engine", adapters=adapters_a, nf4_kernel="bnb")
            serves.update(dict.fromkeys(("mux_one_bnb", "mux_k32_bnb"), "mux_bnb"))
        if "mux_k32_int8" in need:
            specs["mux_int8"] = SystemSpec("engine", adapters=adapters_a, slot_dtype="int8")
            serves["mux_k32_int8"] = "mux_int8"
        dora_load: dict[str, float] = {}
        if "mux_k32_dora" in need:
            adapters_d = write_adapters(
                root,
                linears,
                [16] * 32,
                "d",
                distinct_files=args.distinct_files,
                seed_offset=500,
                dora_weights=base.dequantized_weights(),
            )
            specs["mux_dora"] = SystemSpec("engine", adapters=adapters_d)
            serves["mux_k32_dora"] = "mux_dora"
            dora_load = load_times(base, adapters_a, adapters_d)
            print(f"# adapter load (disk -> CPU, median ms): {dora_load}", flush=True)
        if need & {"mux_one_compiled", "mux_k32_compiled"}:
            specs["mux_compiled"] = SystemSpec(
                "engine", adapters=adapters_a, lora_kernel="compiled"
            )
            serves.update(dict.fromkeys(("mux_one_compiled", "mux_k32_compiled"), "mux_compiled"))
        if need & {"mux_k128", "mux_k128_compiled"}:
            adapters_c = write_adapters(
                root, linears, [16] * 128, "c", distinct_files=args.distinct_files, seed_offset=100
            )
            # All 128 in CPU memory, the last 32 in slots.
            _plan_kernels(need, specs, serves, "mux_k128", "cycling", adapters_c)
        if need & {"mux_ranks", "mux_ranks_compiled"}:
            ranks = [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(32)]
            adapters_r = write_adapters(
                root, linears, ranks, "r", distinct_files=args.distinct_files, seed_offset=300
            )
            _plan_kernels(need, specs, serves, "mux_ranks", "mixed_ranks", adapters_r)
        if "hf_base" in need:
            specs["hf"] = SystemSpec("hf")
            serves["hf_base"] = "hf"
        if need & {"peft_mixed", "peft_sequential"}:
            # Only the adapters some planned run names (PEFT loads each in ~1 s here).
            used = {
                name
                for config in need & {"peft_mixed", "peft_sequential"}
                for batch in batches
                for rep in range(-1, args.reps)
                for name in row_adapters(config, batch, max(rep, 0))
                if name is not None
            }
            specs["peft"] = SystemSpec(
                "hf", adapters={k: v for k, v in adapters_a.items() if k in used}
            )
            serves.update(peft_mixed="peft", peft_sequential="peft")
        isolate = args.isolation == "process" or (
            args.isolation == "auto" and own_base and base.device.type == "cpu"
        )
        if isolate:
            handles: dict[str, Any] = {
                name: SystemProcess(
                    name, Launch(spec, args.model, args.device, max_batch, args.prompt_tokens)
                )
                for name, spec in specs.items()
            }
            for handle in handles.values():
                handle.wait_ready()
        else:
            handles = {
                name: LocalSystem(spec, base, max_batch, prompts) for name, spec in specs.items()
            }
        for name, handle in handles.items():
            print(f"# {name}: ready, set up in {handle.setup_s:.0f}s", flush=True)
        systems = {config: handles[system].run for config, system in serves.items()}
        closers = [handle.close for handle in handles.values()]
        print(f"# set up in {time.perf_counter() - started:.0f}s", flush=True)

        # Warm-up, untimed: every engine configuration at every batch size (allocations,
        # compiled kernels), transformers/PEFT once at the smallest.
        for batch in batches:
            for config in configs:
                if config.startswith("mux") or config == "base" or batch == min(batches):
                    systems[config](config, batch, -1, row_adapters(config, batch, 0))
        measurements: list[Measurement] = []
        rep_started = time.perf_counter()
        for rep in range(args.reps):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
            for batch in batches:
                for config in order:
                    m = systems[config](config, batch, rep, row_adapters(config, batch, rep))
                    measurements.append(m)
            elapsed = time.perf_counter() - started
            per_rep = (time.perf_counter() - rep_started) / (rep + 1)
            print(f"# repetition {rep + 1}/{args.reps} done at {elapsed:.0f}s", flush=True)
            if args.budget_s and elapsed + per_rep > args.budget_s and rep + 1 < args.reps:
                print(f"# stopping: the next repetition would pass --budget-s {args.budget_s}")
                break
        counters = {name: close() for name, close in zip(handles, closers, strict=True)}

    summary = summarise(measurements)
    title = (
        f"{args.model} on {info.get('gpu') or info['cpu_model']}: decode tokens/s, "
        f"{NEW_TOKENS} new tokens, {args.prompt_tokens}-token prompts (x = vs base)"
    )
    print(f"\n## engine: {title}")
    table = print_summary(summary)
    payload = {
        "benchmark": "engine",
        "machine": info,
        "args": vars(args),
        "new_tokens": NEW_TOKENS,
        "summary": summary,
        "table": table,
        "measurements": [
            {**asdict(m), "e2e_tps": m.e2e_tps, "decode_tps": m.decode_tps} for m in measurements
        ],
        "seconds": time.perf_counter() - started,
        "isolation": "process" if isolate else "in-process",
        "dynamo_counters": counters,
        "adapter_load_ms": dora_load,
    }
    print(f"# wrote {write_json(args.out, payload, args.results_dir)}")
    image = plot_path(args.out, args.results_dir)
    plot(summary, image, title)
    print(f"# wrote {image}")
    return payload


if __name__ == "__main__":
    main()
