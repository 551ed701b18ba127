"""Starting real LoRAMux servers for tests: in-process, or as a `loramux serve` subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.server.adapters import LinearShape


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(predicate: Callable[[], bool], timeout: float = 30.0, every: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout` (for state another thread changes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def health_status(address: str, timeout: float = 2.0) -> int:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
        return int(response.status)


class ServerProcess:
    """`loramux serve` in a subprocess, for restarts, signals and SIGKILL."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.metrics_port = free_port()
        self.args = args
        self.env = dict(os.environ if env is None else env)
        self.log = home / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> ServerProcess:
        cmd = [
            sys.executable, "-m", "loramux.cli", "serve",
            "--home", str(self.home),
            "--port", str(self.port),
            "--metrics-port", str(self.metrics_port),
            *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                return health_status(self.address, 1.0) == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        if not eventually(ready, timeout, every=0.2):
            raise RuntimeError(f"server not ready: {self.log.read_text()[-3000:]}")
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def linear_shapes(model_folder: Path) -> dict[str, LinearShape]:
    """The adaptable linear layers of a base model, from its config alone (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loramux.server.lora import base_linear_shapes

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_folder)))
    return base_linear_shapes(skeleton)


AdapterPlan = tuple[
    str, int, float, bool, "tuple[str, ...] | None"
]  # name, rank, alpha, rsLoRA, targets


def write_adapter_plan(
    root: Path, linears: dict[str, LinearShape], plan: list[AdapterPlan], seed_offset: int = 0
) -> dict[str, Path]:
    """Random PEFT adapters, one per plan entry, seeded `seed_offset + i`, weights x 0.06."""
    from loramux.server.synthetic import write_random_adapter

    return {
        name: write_random_adapter(
            root / name,
            linears,
            rank=rank,
            alpha=alpha,
            use_rslora=rslora,
            targets=targets,
            seed=seed_offset + i,
            scale=0.06,
        )
        for i, (name, rank, alpha, rslora, targets) in enumerate(plan)
    }


# A batched bf16 pass moves the 4-bit base's logits by about 1% of their range (see
# docs/engine.md, Correctness), so where PEFT's best logits are closer than this, any of
# them is the model's answer and a served sequence may part from PEFT's there.
NEAR_TIE = 0.015


def near_tie(scores: Any) -> tuple[int, ...] | None:
    """PEFT's nearly tied top tokens at one step ([vocab] scores), best first: every token
    within NEAR_TIE x the scores' span of the best, when there are two or more, else None.

    Every such token, not the first two `topk` returns: where two runners-up have the very
    same logit, topk names one of them at random, and a sequence that took the other one
    parted from PEFT no less at a tie.
    """
    import torch

    values = scores.float()
    span = float(values.max() - values.min())
    close = torch.nonzero(values > values.max() - NEAR_TIE * span).flatten()
    if len(close) < 2:
        return None
    order = torch.argsort(values[close], descending=True, stable=True)
    return tuple(int(t) for t in close[order])


def peft_generate(
    model: Any, ids: list[int], adapter: str | None, new_tokens: int
) -> tuple[list[int], list[tuple[int, ...] | None]]:
    """PEFT's greedy tokens (`adapter`, or the base model for None) and, per position, its
    nearly tied best tokens (or None)."""
    import torch

    if adapter is None:
        context: Any = model.disable_adapter()
    else:
        model.set_adapter(adapter)
        context = torch.inference_mode()
    with context, torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), [near_tie(s[0]) for s in out.scores]


def tokens_before_parting(
    got: list[int], want: list[int], ties: list[tuple[int, ...] | None], context: Any
) -> int:
    """How many tokens `got` shares with PEFT's `want` before they part, asserting that a
    parting is where PEFT's own best logits were nearly tied (`ties`, per position, from
    `near_tie`), by taking one of them: nothing after it is comparable."""
    for i, (mine, theirs) in enumerate(zip(got, want, strict=False)):
        if mine != theirs:
            tie = ties[i]
            assert tie is not None and mine in tie, (context, i, mine, theirs)
            return i
    return min(len(got), len(want))


def peft_request_adapter(model: Any, parts: list[tuple[str, float]], name: str) -> str | None:
    """The PEFT adapter that answers a request's (adapter, weight) parts: None (the base)
    for no parts or one at weight 0, the adapter itself at weight 1 (PEFT's copy would keep
    rsLoRA's factor), else PEFT's `add_weighted_adapter(..., "cat")`, added as `name`."""
    weights = [w for _, w in parts]
    if not parts or weights == [0.0]:
        return None
    if weights == [1.0]:
        return parts[0][0]
    model.add_weighted_adapter([n for n, _ in parts], weights, name, combination_type="cat")
    return name


def peft_with_adapters(resolved: Any, dirs: dict[str, Path]) -> Any:
    """The reference: the NF4 base in a PeftModel with every adapter of `dirs`, eval mode."""
    from loramux.core.models import load_base_model

    return peft_on(load_base_model(resolved, "nf4", "cpu"), dirs)


def engine_with_adapters(resolved: Any, dirs: dict[str, Path], **settings: Any) -> Any:
    """An Engine on the NF4 base, warmed up, with every adapter of `dirs` registered."""
    from loramux.core.config import Settings
    from loramux.core.models import load_base_model, load_tokenizer
    from loramux.server.engine import Engine

    engine = Engine(
        load_base_model(resolved, "nf4", "cpu"),
        load_tokenizer(resolved),
        Settings(**settings),
        resolved,
    )
    engine.warm_up()
    for name, folder in dirs.items():
        engine.adapters.register(name, folder)
    return engine


def dequantized_copy(resolved: Any) -> Any:
    """The NF4 base with every 4-bit linear layer replaced by a bf16 nn.Linear holding its
    dequantised weight (`dequantize_4bit`, before any forward pass): the same base weights
    in layers PEFT's DoRA reads correctly (docs/api.md, DoRA: PEFT's own DoRA on a
    bitsandbytes 4-bit layer is not the reference)."""
    import bitsandbytes as bnb
    import torch

    from loramux.core.models import load_base_model

    model = load_base_model(resolved, "nf4", "cpu")
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        linear = torch.nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            dtype=torch.bfloat16,
        )
        linear.weight.data.copy_(weight)
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.data)
        linear.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def peft_on(base: Any, dirs: dict[str, Path]) -> Any:
    """`base` in a PeftModel with every adapter of `dirs`, eval mode."""
    from peft import PeftModel

    names = list(dirs)
    model = PeftModel.from_pretrained(base, str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    model.eval()
    return model


def greedy_grid(
    engine: Any, names: list[str | None], prompts: list[list[int]], new_tokens: int
) -> dict[tuple[str | None, int], list[int]]:
    """Every adapter name (None: the base) on every prompt, all submitted before any is
    read (one running batch), greedy with ignore_eos: the tokens keyed by (name, prompt)."""
    from loramux.server.requests import GenerationRequest, SamplingParams

    streams = {
        (name, p): engine.submit(
            GenerationRequest(
                f"{name}-{p}",
                ids,
                SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                name,
            )
        )
        for name in names
        for p, ids in enumerate(prompts)
    }
    return {key: [t for e in stream for t in e.token_ids] for key, stream in streams.items()}
