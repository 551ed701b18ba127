"""The loss-curve picture saved next to the adapter (and shown in its model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOSS_CURVE_FILE = "loss_curve.png"


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Train and eval loss against the optimizer step; None when there is nothing to draw.

    Uses matplotlib's Agg backend explicitly: training runs on servers without a display.
    """
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path
