"""Figures a person would rather look at than read, drawn with matplotlib off-screen.

Every function writes one PNG atomically and imports matplotlib only when called, so commands
that draw nothing start fast.
"""

from __future__ import annotations

import io
import math
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


def leakage_over_training(series: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Test accuracy and an attack's mean SSIM against the training epoch, one line per defense.

    The PRECODE paper's central figure: does a defense keep protecting while the model learns, and
    what does it cost? `series` maps a caption to rows with `epoch`, `test_accuracy` (None for
    epoch 0: `precode train` measures after each epoch, so the untrained model has no point on the
    left) and `mean_ssim`. A defense keeps its colour in both panels. The accuracy axis starts at the
    tenth below the lowest accuracy, so that defenses a point apart (99% against 98%) stay apart.
    """
    plt = _pyplot()
    figure, (accuracy_axes, ssim_axes) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    colours = plt.get_cmap("tab10")
    lowest, least_accurate = 0.0, 1.0
    for number, (caption, rows) in enumerate(series.items()):
        rows = sorted(rows, key=lambda row: row["epoch"])
        colour = colours(number % 10)
        measured = [row for row in rows if row.get("test_accuracy") is not None]
        accuracy_axes.plot([row["epoch"] for row in measured], [row["test_accuracy"] for row in measured],
                           marker="o", color=colour, label=caption)
        ssim_axes.plot([row["epoch"] for row in rows], [row["mean_ssim"] for row in rows], marker="o", color=colour,
                       label=caption)
        lowest = min([lowest, *(row["mean_ssim"] for row in rows)])
        least_accurate = min([least_accurate, *(row["test_accuracy"] for row in measured)])
    accuracy_axes.set_ylabel("test accuracy after the epoch")
    accuracy_axes.set_ylim(max(0.0, math.floor(10 * least_accurate - 0.2) / 10), 1.005)
    accuracy_axes.yaxis.set_major_formatter(_percent_formatter())
    ssim_axes.set_ylabel("mean SSIM of the reconstructions")
    ssim_axes.set_ylim(min(lowest - 0.05, -0.05), 1.02)
    for axes in (accuracy_axes, ssim_axes):
        axes.set_xlabel("epoch (0: untrained)")
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(_integer_ticks())
    ssim_axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    _save(figure, path)


# What a defense is called in a picture for people who have not read the docs.
PLAIN_DEFENSE_NAMES = {"none": "no defense", "precode": "PRECODE"}
PLAIN_ATTACK_NAMES = {"ig": "Inverting Gradients", "dlg": "DLG", "idlg": "iDLG"}


def plain_defense_name(defense: str) -> str:
    """'none' -> 'no defense', 'precode' -> 'PRECODE', 'precode+noise' -> 'PRECODE + noise'."""
    if defense in PLAIN_DEFENSE_NAMES:
        return PLAIN_DEFENSE_NAMES[defense]
    return " + ".join(PLAIN_DEFENSE_NAMES.get(part, part) for part in defense.split("+"))


def _image_array(image: Any) -> Any:
    """A CHW tensor in [0, 1] as an HWC (or HW, grey) array matplotlib shows as is."""
    array = image.detach().float().clamp(0, 1).cpu()
    return array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy()


def story_panels(report_dir: Path, max_victims: int = 8) -> tuple[list[tuple[Any, str]], list[dict[str, Any]]]:
    """The originals and each group's reconstructions with their SSIM, from a report folder and the files it names.

    Reads REPORT_DIR/metrics.json (written by `precode evaluate`), then for each of its first
    `max_victims` rows per group the reconstruction file in the group's folder and the truth file whose
    dump it reconstructs (found among the `truth_dirs` the report records). The originals are those of
    the first group. Returns ([(original, class name), ...], one dict per group with its plain-language
    `caption`, `mean_ssim`, `attack`, `attack_params` and `cells`: [(reconstruction, ssim), ...]).
    """
    import json

    from precode_cli import fileformat
    from precode_cli.stages.attack import TRUTH_SUFFIX

    document = json.loads((Path(report_dir) / "metrics.json").read_text(encoding="utf-8"))
    truth_by_dump: dict[str, Path] = {}
    for directory in document["provenance"]["truth_dirs"]:
        for path in sorted(Path(directory).glob(f"*{TRUTH_SUFFIX}")):
            dump = fileformat.read_meta(path, "truth")["dump"]
            truth_by_dump[dump["sha256"]] = path
            if dump.get("content_sha256"):  # a client update's truth, written by precode's Flower truth mod
                truth_by_dump.setdefault(dump["content_sha256"], path)
    originals: list[tuple[Any, str]] = []
    rows_out = []
    for number, group in enumerate(document["groups"]):
        rows = [r for r in document["per_victim"] if r["group"] == group["name"]]
        # Columns by victim, not by file name: the groups' files may be named apart (Flower node ids differ per run).
        rows = sorted(rows, key=lambda r: (r.get("dataset_index", 0), r["position"]))[:max_victims]
        cells = []
        for row in rows:
            recon = fileformat.read(Path(group["recon_dir"]) / row["recon_file"], "reconstruction")
            cells.append((recon.tensors["images"][row["matched_position"]], float(row["ssim"])))
            if number == 0:
                source = recon.meta["source"]
                truth_path = truth_by_dump.get(source["sha256"]) or truth_by_dump[source.get("content_sha256")]
                truth = fileformat.read(truth_path, "truth")
                label = row.get("true_class") or f"class {row['true_label']}"
                originals.append((truth.tensors["images"][row["position"]], str(label)))
        rows_out.append({"caption": plain_defense_name(group["defense"]), "mean_ssim": group["summary"]["mean_ssim"],
                         "attack": group.get("attack"), "attack_params": group.get("attack_params") or {},
                         "cells": cells})
    return originals, rows_out


def story(report_dir: Path, path: Path, histories: dict[str, Path] | None = None, title: str | None = None) -> None:
    """One picture of a whole experiment: originals, each model's reconstructions with SSIM, training curves.

    The top rows are the victims' originals, then one row per group of the report in REPORT_DIR
    (captioned in plain words: "no defense", "PRECODE") with each reconstruction's SSIM under it.
    With `histories` ({caption: RUN_DIR/history.json}), a last panel draws every run's test error
    (1 - accuracy) per epoch on one log-scale axis, where 99.5% and 99.7% accuracy (0.5% and 0.3%
    error) lie visibly apart. Used by examples/quickstart.sh:

        python -m precode_cli.plots story REPORT_DIR OUT.png [CAPTION=RUN_DIR/history.json ...]
    """
    import json

    plt = _pyplot()
    originals, groups = story_panels(Path(report_dir))
    columns = max(len(originals), 1)
    image_rows = 1 + len(groups)
    curve_rows = 1 if histories else 0
    heights = [1.0] * image_rows + [2.2] * curve_rows
    figure = plt.figure(figsize=(max(1.25 * columns, 5.0) + 1.4, 1.35 * image_rows + 2.6 * curve_rows + 0.6))
    grid = figure.add_gridspec(image_rows + curve_rows, columns, height_ratios=heights, hspace=0.45, wspace=0.08)
    labels = ["original"] + [f"{g['caption']}\nmean SSIM {g['mean_ssim']:.2f}" for g in groups]
    cells_by_row = [originals] + [g["cells"] for g in groups]
    for r, (label, cells) in enumerate(zip(labels, cells_by_row)):
        for c in range(columns):
            ax = figure.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(cells):
                image, caption = cells[c]
                array = _image_array(image)
                ax.imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
                ax.set_xlabel(caption if r == 0 else f"SSIM {caption:.2f}", fontsize=9, labelpad=2)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=10, rotation=0, ha="right", va="center", labelpad=8)
    if histories:
        ax = figure.add_subplot(grid[image_rows, :])
        for caption, history_path in histories.items():
            epochs = json.loads(Path(history_path).read_text(encoding="utf-8"))["epochs"]
            xs = [row["epoch"] for row in epochs]
            errors = [max(1.0 - float(row["test_accuracy"]), 1e-4) for row in epochs]
            final = 100 * float(epochs[-1]["test_accuracy"]) if epochs else float("nan")
            ax.plot(xs, errors, marker="o", label=f"{caption}: {final:.2f}% test accuracy after epoch {xs[-1] if xs else 0}")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_percent_formatter())
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (log)")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    figure.suptitle(title or "Can the server rebuild the client's images from its gradients?", fontsize=11)
    attacks = {(g["attack"], g["attack_params"].get("iterations")) for g in groups}
    attack_text = "; ".join(f"{PLAIN_ATTACK_NAMES.get(name, name)}" + (f", {iters} iterations" if iters else "") for name, iters in sorted(
        attacks, key=str))
    figure.text(0.5, 0.0, f"Each row below the originals: what the attack ({attack_text}) rebuilt from that model's "
                "gradients alone.\nSSIM 1: the image came back exactly; near 0: nothing of it came back.",
                ha="center", va="top", fontsize=8.5)
    _save(figure, Path(path))


def _percent_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{100 * value:g}%")


def main(argv: list[str] | None = None) -> int:
    """`python -m precode_cli.plots story REPORT_DIR OUT.png [CAPTION=HISTORY.json ...] [--title TEXT]`."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    title = None
    if "--title" in args:
        at = args.index("--title")
        title = args[at + 1]
        del args[at:at + 2]
    if len(args) < 3 or args[0] != "story":
        print(main.__doc__, file=sys.stderr)
        return 2
    histories = dict(item.split("=", 1) for item in args[3:]) or None
    story(Path(args[1]), Path(args[2]), {k: Path(v) for k, v in (histories or {}).items()} or None, title)
    print(f"Wrote {args[2]}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
