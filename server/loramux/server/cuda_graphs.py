"""CUDA graphs for decode steps: which padded batch sizes, and a capture/replay wrapper.

A decode step of a small batch on a GPU costs more in kernel launches from Python than in
arithmetic; a CUDA graph records a step's kernels once for a fixed batch size and replays
them with one launch. A batch of any size then runs as the smallest captured size that
holds it, its extra rows padding; batches larger than every captured size run eagerly.
vLLM captures 1, 2, 4 and then every multiple of 8 (of 16 past 256) up to about twice
its largest batch; SGLang a similar list, largest first so smaller graphs reuse the
larger ones' memory pool. `capture_sizes` here: 1, 2, 4, then every multiple of 8 up to
--max-batch-size, and --max-batch-size itself.

**Not wired into the engine, and never run on a GPU.** The engine's decode step cannot be
captured as it is: each step builds its inputs from Python lists (tokens, positions, block
tables), the LoRA routing picks a path and rank classes on the host from the batch's
slots (lora/metadata.py), the paged attention's block tables and context lengths change
every step, and sampling reads the logits on the host. A graph replays fixed addresses
and fixed shapes, so all of that would first have to move into static device buffers
filled before each replay, with the routing decided for the padded size. So `--cuda-graphs`
is refused at start on every device, with the reason (`check_setting`); what is here is
what that work would sit on, tested on the CPU: the bucket choice, and the wrapper's
copy-in / replay / slice-out with an eager stand-in for the graph (`EagerCapture`), the
same object on CUDA recording real graphs (`CudaCapture`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, Protocol

import torch

SIZE_STEP = 8  # past 4 rows, capture every multiple of this


def capture_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The decode batch sizes to capture, ascending: 1, 2, 4, every multiple of SIZE_STEP
    up to `max_batch_size`, and `max_batch_size` itself."""
    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    sizes = {s for s in (1, 2, 4) if s <= max_batch_size}
    sizes.update(range(SIZE_STEP, max_batch_size + 1, SIZE_STEP))
    sizes.add(max_batch_size)
    return tuple(sorted(sizes))


def padded_size(rows: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest captured size that holds `rows` (None: larger than all, run eagerly)."""
    if rows < 1:
        raise ValueError(f"a decode batch has at least one row, got {rows}")
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else None


def check_setting(enabled: bool, device: torch.device) -> None:
    """Refuse --cuda-graphs at start, saying why (see the module's docstring)."""
    if not enabled:
        return
    if device.type != "cuda":
        raise ValueError(
            f"--cuda-graphs needs a CUDA device; this engine runs on {device.type} "
            "(drop --cuda-graphs)"
        )
    raise ValueError(
        "--cuda-graphs: the engine's decode step cannot be captured yet (host-side LoRA "
        "routing, per-step block tables and input lists); it stays off until that is done "
        "and measured (docs/engine.md, CUDA graphs)"
    )


class Replay(Protocol):
    def replay(self) -> None: ...


class GraphCapture(Protocol):
    """Records a step once over static buffers; replaying reruns it over their contents."""

    def capture(self, step: Callable[[], None]) -> Replay: ...


class EagerCapture:
    """The CPU's stand-in for a graph: `replay` calls the step again, over the same static
    buffers (what a graph's replay does, without the recording)."""

    def capture(self, step: Callable[[], None]) -> Replay:
        step()  # as a capture runs it once
        return _EagerReplay(step)


class _EagerReplay:
    def __init__(self, step: Callable[[], None]) -> None:
        self._step = step

    def replay(self) -> None:
        self._step()


class CudaCapture:
    """Real CUDA graphs sharing one memory pool (never run: no GPU has been lent)."""

    def __init__(self) -> None:
        self._pool: Any = None  # the first graph's memory pool handle, shared by the rest

    def capture(self, step: Callable[[], None]) -> Replay:
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            step()  # warm-up outside the graph (lazy inits, autotuning)
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        self._pool = graph.pool()
        return graph


class PaddedDecode:
    """Runs `forward(inputs [size, ...]) -> outputs [size, ...]` for any batch of up to the
    largest captured size as the smallest captured size that holds it.

    Inputs are copied into the first rows of a static buffer (the rest hold `pad`), the
    size's recorded step is replayed, and the real rows of its static output are returned
    (a copy: the next replay overwrites the buffer). Larger batches run `forward` eagerly.
    Sizes are captured largest first, so the smaller ones reuse the larger ones' memory.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        example: torch.Tensor,  # [1, ...] one row of input: its dtype, device and row shape
        sizes: tuple[int, ...],
        capture: GraphCapture,
        pad: float = 0,
    ) -> None:
        self.forward = forward
        self.sizes = sizes
        self.pad = pad
        largest = sizes[-1]
        # [largest, ...] the inputs every captured size reads its first rows of
        self.inputs = torch.full(
            (largest, *example.shape[1:]), pad, dtype=example.dtype, device=example.device
        )
        self.outputs: dict[int, torch.Tensor] = {}  # size -> [size, ...] its static output
        self.replays: dict[int, Replay] = {}
        for size in reversed(sizes):
            self.replays[size] = capture.capture(self._recorder(size))

    def _recorder(self, size: int) -> Callable[[], None]:
        def step() -> None:
            out = self.forward(self.inputs[:size])
            held = self.outputs.get(size)
            if held is None:
                self.outputs[size] = out
            else:
                held.copy_(out)

        return step

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.shape[0]
        size = padded_size(rows, self.sizes)
        if size is None:
            return self.forward(inputs)
        self.inputs[:rows].copy_(inputs)
        self.inputs[rows:size].fill_(self.pad)
        self.replays[size].replay()
        return self.outputs[size][:rows].clone()
