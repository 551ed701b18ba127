"""The naive baseline server: what one writes with PEFT alone, behind LoRAMux's own API.

    python -m bench.naive_server --port 50061 --adapters DIR [--device cpu]

It speaks loramux.v1.InferenceService (same .proto, so bench.serve drives both servers
with the same client code) and serves ONE request at a time: a lock around
`set_adapter(name)` + `generate()`, streaming each token as it is made. Every adapter in
DIR (one PEFT folder per adapter, named by its folder) is loaded into the PeftModel at
start, so no request ever waits for a disk load: the baseline gets that for free.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger("naive_server")
DEFAULT_MAX_NEW_TOKENS = 64


class TokenQueue:
    """A transformers streamer that hands each new token id to the gRPC handler."""

    def __init__(self) -> None:
        self.tokens: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt itself
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        self.tokens.put(None)

    def __iter__(self) -> Iterator[int]:
        while (token := self.tokens.get()) is not None:
            yield token


class NaiveInference(pb_grpc.InferenceServiceServicer):
    def __init__(self, model: Any, tokenizer: Any, adapters: set[str], device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.device = device
        self.lock = threading.Lock()  # one request at a time: the baseline's defining trait

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        if request.WhichOneof("input") == "chat":
            rendered = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.chat.messages],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
            return list(rendered["input_ids"])
        return list(self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        if request.adapter and request.adapter not in self.adapters:
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter: no adapter {request.adapter!r}")
        ids = self._prompt_ids(request)
        if not ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: is empty")
        new_tokens = (
            request.max_new_tokens if request.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        )
        made: list[int] = []
        with self.lock:
            if request.adapter:
                self.model.set_adapter(request.adapter)
                adapter_context: Any = contextlib.nullcontext()
            else:
                adapter_context = self.model.disable_adapter()
            streamer = TokenQueue()
            worker = threading.Thread(
                target=self._generate,
                args=(ids, new_tokens, request.ignore_eos, streamer, adapter_context),
                daemon=True,
            )
            worker.start()
            try:
                for token in streamer:
                    made.append(token)
                    yield pb.GenerateStreamResponse(
                        request_id=request.request_id, token_ids=[token]
                    )
            finally:
                worker.join()
        eos = self.tokenizer.eos_token_id
        yield pb.GenerateStreamResponse(
            request_id=request.request_id,
            text=self.tokenizer.decode(made, skip_special_tokens=True),
            finish_reason=(
                pb.FINISH_REASON_EOS if made and made[-1] == eos else pb.FINISH_REASON_LENGTH
            ),
            usage=pb.Usage(prompt_tokens=len(ids), completion_tokens=len(made)),
        )

    def _generate(
        self,
        ids: list[int],
        new_tokens: int,
        ignore_eos: bool,
        streamer: TokenQueue,
        adapter_context: Any,
    ) -> None:
        try:
            with adapter_context, torch.inference_mode():
                tensor = torch.tensor([ids], device=self.device)
                self.model.generate(
                    input_ids=tensor,
                    attention_mask=torch.ones_like(tensor),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens if ignore_eos else None,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    streamer=streamer,
                )
        except Exception:
            log.exception("generate failed")
            streamer.end()

    def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfoResponse:
        return pb.ModelInfoResponse(base_model="naive-peft", max_batch_size=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--adapters", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="naive: %(message)s")

    from peft import PeftModel

    from bench.common import load_model, set_threads
    from loramux.server.threads import in_own_thread

    set_threads()
    started = time.perf_counter()
    base = load_model("smollm2", args.device)
    folders = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file())

    def load_adapters() -> Any:
        model = PeftModel.from_pretrained(base.model, str(folders[0]), adapter_name=folders[0].name)
        for folder in folders[1:]:
            model.load_adapter(str(folder), adapter_name=folder.name)
        return model.eval()

    # On a thread that ends, as LoRAMux loads its model: only the thread generating keeps
    # OpenMP workers (loramux.server.threads), so the baseline is not slowed by our setup.
    model = in_own_thread(load_adapters, "load-adapters")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    servicer = NaiveInference(model, base.tokenizer, {f.name for f in folders}, args.device)
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    log.info(
        "serving %d adapters on port %d (ready in %.0fs)",
        len(folders),
        args.port,
        time.perf_counter() - started,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
