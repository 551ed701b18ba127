"""Data-parallel training across processes: which process this is, and starting N of them.

The processes follow torchrun's environment contract (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), which accelerate and transformers' Trainer
read to run DistributedDataParallel: NCCL on CUDA (one process per GPU, each holding its own
4-bit copy of the base), gloo on the CPU. So ``torchrun --nproc-per-node N -m loramux.cli
train ...`` and ``accelerate launch`` work as well as ``loramux train --nproc N``, which
starts the processes itself so that Ctrl-C reaches each of them once (torchrun's agent would
add a SIGTERM of its own, which the trainer reads as a second Ctrl-C: abort without saving).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )

    @property
    def is_main(self) -> bool:
        """Only the main process writes the output folder, plots, prints and publishes."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: process k on this machine uses cuda:k."""
        import torch

        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device


def any_rank(flag: bool) -> bool:
    """True on every process when it is true on any (a collective: every process must call)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    backend = dist.get_backend()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line for each process: the same, less the --nproc option."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_all(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """Wait for every process; when one fails, stop the others (they would wait forever for
    it in their next collective operation)."""
    stopping = False
    while True:
        codes = [proc.poll() for proc in procs]
        if all(code is not None for code in codes):
            return [int(code) for code in codes if code is not None]
        if not stopping and any(code not in (None, 0, 130) for code in codes):
            stopping = True
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        try:
            next(p for p in procs if p.poll() is None).wait(timeout=0.5)
        except (subprocess.TimeoutExpired, StopIteration):
            continue


def launch_processes(nproc: int, argv: Sequence[str]) -> int:
    """Run `loramux <argv>` in `nproc` processes on this machine; their worst exit status.

    Ctrl-C from a terminal reaches every process (one process group); this launcher ignores
    it and waits, so each process saves its part of the checkpoint and exits. A SIGTERM sent
    to the launcher is passed on to each process once.
    """
    if not argv or argv[0] != "train":
        raise ValueError("--nproc: run it as `loramux train ... --nproc N`")
    return launch(nproc, [sys.executable, "-m", "loramux.cli", *without_nproc(argv)])


def launch(nproc: int, command: Sequence[str]) -> int:
    """Run `command` as `nproc` data-parallel processes on this machine (see
    `launch_processes`); their worst exit status."""
    port = _free_port()
    # torchrun's rule: without a setting, share the cores rather than oversubscribe them.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs: list[subprocess.Popen[bytes]] = []
    for rank in range(nproc):
        env = dict(
            os.environ,
            OMP_NUM_THREADS=threads,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(subprocess.Popen(list(command), env=env))

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, forward)
    try:
        codes = _wait_all(procs)
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
    failed = [code for code in codes if code != 0]
    return max(failed, key=abs) if failed else 0
