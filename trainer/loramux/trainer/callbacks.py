"""Trainer callbacks: the metrics log, and Ctrl-C that saves a checkpoint instead of losing work.

Both hook into transformers' ``TrainerCallback`` so the training loop itself stays the
well-kept one from transformers.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogCallback(TrainerCallback):  # type: ignore[misc]
    """Appends every log event (train loss, eval loss, learning rate...) as one JSON line.

    One line per event keeps the file readable while training runs (``tail -f``) and makes a
    crash lose at most the line being written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float | str)})
        record["elapsed_s"] = round(time.monotonic() - self.started, 2)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trim_metrics(path: Path, after_step: int) -> None:
    """On resume, drop records past the checkpoint: the resumed run logs those steps again."""
    records = read_metrics(path)
    kept = [r for r in records if int(r.get("step", 0)) <= after_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


class InterruptCallback(TrainerCallback):  # type: ignore[misc]
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into "save a checkpoint, then stop".

    The step in flight finishes, the Trainer saves a full checkpoint (adapter, optimizer,
    scheduler, RNG state) and returns normally, so ``--resume`` continues from there. A
    second signal restores the default behaviour and interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal number received
        self.stopped = False  # training was stopped for it (on every process alike)
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Install the handlers; only possible from the main thread (else a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = signum
        log.warning(
            "%s received: saving a checkpoint after this step (press Ctrl-C again to abort now)",
            signal.Signals(signum).name,
        )

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        from loramux.trainer.distributed import any_rank

        # Every process stops after the same step, even if the signal reached only some
        # (or reached them during different steps): the checkpoint is one consistent state.
        if any_rank(self.requested is not None):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
