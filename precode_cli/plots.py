"""Figures a person would rather look at than read, drawn with matplotlib off-screen.

Every function writes one PNG atomically and imports matplotlib only when called, so commands
that draw nothing start fast.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from precode_cli import atomic


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    atomic.write_bytes(path, buffer.getvalue())


def training_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, train and test, side by side."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 3.8))
    for axes, key, label in ((loss_axes, "loss", "loss"), (accuracy_axes, "accuracy", "accuracy")):
        axes.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", label=f"train {label}")
        axes.plot(epochs, [row[f"test_{key}"] for row in history], marker="s", label=f"test {label}")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
        axes.xaxis.set_major_locator(_integer_ticks())
    accuracy_axes.set_ylim(0, 1.02)
    figure.suptitle(title)
    _save(figure, path)


def ssim_histogram(values: dict[str, list[float]], path: Path, title: str, threshold: float | None = None) -> None:
    """The distribution of SSIM over victims, one panel per group, on a common [0, 1] axis."""
    plt = _pyplot()
    count = max(len(values), 1)
    figure, axes = plt.subplots(count, 1, figsize=(7, 1.9 * count + 0.6), sharex=True, squeeze=False)
    bins = [i / 20 for i in range(21)]
    for ax, (name, ssims) in zip(axes[:, 0], values.items()):
        ax.hist([min(max(v, 0.0), 1.0) for v in ssims], bins=bins, color="tab:blue", edgecolor="white")
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1)
        mean = sum(ssims) / len(ssims) if ssims else float("nan")
        ax.set_title(f"{name}: n={len(ssims)}, mean {mean:.3f}", fontsize=9, loc="left")
        ax.set_ylabel("victims")
        ax.yaxis.set_major_locator(_integer_ticks())
    axes[-1, 0].set_xlim(0, 1)
    axes[-1, 0].set_xlabel("SSIM" + (f" (dashed: success threshold {threshold:g})" if threshold is not None else ""))
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)
