"""A PNG of the training curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from protokit.atomic import atomic_write

LOSS_TERMS = ("ce", "cluster", "separation", "avg_separation", "l1")


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (train/val per epoch, val after each push) and each loss term."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sgd = [h for h in history if h["stage"] in ("warm", "joint")]
    pushes = [h for h in history if h["stage"] == "last_layer"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if sgd:
        ax.plot([h["epoch"] for h in sgd], [h["train"]["accuracy"] for h in sgd], label="train")
        ax.plot([h["epoch"] for h in sgd], [h["val"]["accuracy"] for h in sgd], label="val")
    if pushes:
        ax.plot(
            [h["epoch"] for h in pushes],
            [h["val"]["accuracy"] for h in pushes],
            "o",
            label="val after push + last layer",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    for term in LOSS_TERMS:
        if sgd:
            ax.plot([h["epoch"] for h in sgd], [h["train"][term] for h in sgd], label=term)
    ax.set_xlabel("epoch")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_title("training loss terms")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
