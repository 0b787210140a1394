"""Evaluation outputs: metrics.json, metrics.csv, grid.png and report.md.

A group is one set of reconstructions (one RECON_DIR: one model, defense and attack) scored
against its truth files; a report holds one or more groups side by side.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from precode_cli import atomic, plots
from precode_cli.metrics import CONVENTIONS

SUMMARY_KEYS = ("n", "mean_ssim", "mean_psnr", "mean_mse", "asr", "label_accuracy")
CSV_COLUMNS = ("group", "recon_file", "position", "matched_position", "dataset_index", "true_label", "true_class",
               "recon_label", "ssim", "psnr", "mse", "lpips", "success")
MATCHING = ("Reconstructions of a batch (B > 1) are paired with the originals by an optimal assignment that maximises "
            "the total pixel-space SSIM (scipy.optimize.linear_sum_assignment) before they are scored.")
GRID_MAX_VICTIMS = 16
GRID_SCALE = 3


@dataclass
class Group:
    """Scored reconstructions of one RECON_DIR."""

    name: str
    recon_dir: str
    details: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    originals: list[torch.Tensor] = field(default_factory=list)
    reconstructions: list[torch.Tensor] = field(default_factory=list)

    def summary(self, threshold: float) -> dict[str, Any]:
        return summarize(self.rows, threshold)


def summarize(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Means over victims, and the attack success rate: the fraction with SSIM >= threshold."""
    n = len(rows)
    if n == 0:
        return {"n": 0, "mean_ssim": None, "mean_psnr": None, "mean_mse": None, "asr": None,
                "label_accuracy": None, "threshold": threshold}

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / n

    summary = {
        "n": n,
        "mean_ssim": mean("ssim"),
        "mean_psnr": mean("psnr"),
        "mean_mse": mean("mse"),
        "asr": sum(r["ssim"] >= threshold for r in rows) / n,
        "label_accuracy": sum(r["recon_label"] == r["true_label"] for r in rows) / n,
        "threshold": threshold,
    }
    if all("lpips" in r for r in rows):
        summary["mean_lpips"] = mean("lpips")
    return summary


def accuracy_text(details: dict[str, Any]) -> str:
    """The attacked model's test accuracy as a table cell: a percentage, or what is known instead."""
    accuracy = details.get("test_accuracy")
    if accuracy is not None:
        return f"{100 * accuracy:.1f}% ({details.get('model_state')})"
    return details.get("model_state") or "-"


def write_all(
    out: Path, groups: list[Group], threshold: float, provenance: dict[str, Any], note: str | None = None,
    space: str = "pixel",
) -> dict[str, Any]:
    """Write the report files atomically; returns the metrics.json document."""
    all_rows = [row for g in groups for row in g.rows]
    convention = CONVENTIONS[space]
    document = {
        "convention": convention,
        "space": space,
        "matching": MATCHING,
        "threshold": threshold,
        "summary": summarize(all_rows, threshold) if len(groups) > 1 else groups[0].summary(threshold),
        "groups": [
            {"name": g.name, "recon_dir": g.recon_dir, **g.details, "summary": g.summary(threshold)} for g in groups
        ],
        "per_victim": all_rows,
        "provenance": provenance,
    }
    atomic.write_text(out / "metrics.json", json.dumps(document, indent=2) + "\n")
    atomic.write_text(out / "metrics.csv", _csv(all_rows))
    atomic.write_bytes(out / "grid.png", _grid_png(groups))
    plots.ssim_histogram({g.name: [r["ssim"] for r in g.rows] for g in groups}, out / "ssim_hist.png",
                         f"SSIM over victims ({space} space)", threshold)
    atomic.write_text(out / "report.md", _markdown(groups, threshold, provenance, note, convention))
    return document


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    pil = Image.frombytes("RGB", (array.shape[2], array.shape[1]), array.permute(1, 2, 0).contiguous().numpy().tobytes())
    return pil.resize((pil.width * GRID_SCALE, pil.height * GRID_SCALE), Image.NEAREST)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=13)  # Pillow >= 10.1 with FreeType: a readable scalable font
    except TypeError:
        return ImageFont.load_default()


def _grid_png(groups: list[Group]) -> bytes:
    """Per group: a title line, originals above reconstructions, each reconstruction's SSIM below it."""
    font = _font()
    sample = groups[0].originals[0]
    cell_w, cell_h = sample.shape[2] * GRID_SCALE, sample.shape[1] * GRID_SCALE
    pad, label_w, title_h, caption_h = 6, 112, 24, 16
    columns = max(min(len(g.rows), GRID_MAX_VICTIMS) for g in groups)
    group_h = title_h + 2 * cell_h + caption_h * 2 + pad * 3
    width = label_w + columns * (cell_w + pad) + pad + 48  # room for the last caption
    canvas = Image.new("RGB", (width, group_h * len(groups) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for gi, group in enumerate(groups):
        top = gi * group_h + pad
        summary = summarize(group.rows, 0.0)
        draw.text((pad, top + 4), f"{group.name}    mean SSIM {summary['mean_ssim']:.3f}", fill="black", font=font)
        row_originals = top + title_h
        row_recon = row_originals + cell_h + caption_h + pad
        draw.text((pad, row_originals + cell_h // 2), "original", fill="black", font=font)
        draw.text((pad, row_recon + cell_h // 2), "reconstruction", fill="black", font=font)
        for i, row in enumerate(group.rows[:GRID_MAX_VICTIMS]):
            left = label_w + i * (cell_w + pad)
            canvas.paste(_to_pil(group.originals[i]), (left, row_originals))
            draw.text((left, row_originals + cell_h + 2), row.get("true_class") or f"label {row['true_label']}", fill="dimgray", font=font)
            canvas.paste(_to_pil(group.reconstructions[i]), (left, row_recon))
            draw.text((left, row_recon + cell_h + 2), f"SSIM {row['ssim']:.2f}", fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


THREATS = {"honest-but-curious": "an honest-but-curious server, which only reads what the client shares",
           "malicious-server": "a malicious server, which changed the model it sent"}


def _markdown(groups: list[Group], threshold: float, provenance: dict[str, Any], note: str | None,
              convention: str) -> str:
    lines = ["# Gradient-leakage evaluation", ""]
    if note:
        lines += [note.strip(), ""]
    lines += [
        f"Metrics convention: {convention}. Attack success rate (ASR): fraction of victims with SSIM >= {threshold:g}. "
        f"{MATCHING} "
        + ("LPIPS: AlexNet backbone from --lpips-weights, torchmetrics' linear heads, lower is more alike."
           if any("mean_lpips" in g.summary(threshold) for g in groups) else "LPIPS: not computed (--lpips-weights)."),
        "",
        "| reconstructions | model | defense | attack | n | mean SSIM | mean PSNR (dB) | mean MSE | mean LPIPS | ASR "
        "| label accuracy | model's test accuracy |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for g in groups:
        s = g.summary(threshold)
        lines.append(
            f"| `{g.recon_dir}` | {g.details['model']} | {g.details['defense']} | {g.details['attack']} | {s['n']} "
            f"| {_fmt(s['mean_ssim'])} | {_fmt(s['mean_psnr'], 2)} | {_fmt(s['mean_mse'], 5)} "
            f"| {_fmt(s.get('mean_lpips'))} | {_fmt(s['asr'], 2)} "
            f"| {_fmt(s['label_accuracy'], 2)} | {accuracy_text(g.details)} |"
        )
    lines += ["", "## Originals and reconstructions", "",
              "![originals above reconstructions, per group](grid.png)", "",
              "## SSIM over victims", "", "![histogram of SSIM over victims, per group](ssim_hist.png)", ""]
    if any(len(g.rows) > GRID_MAX_VICTIMS for g in groups):
        lines += [f"The picture shows the first {GRID_MAX_VICTIMS} victims of each group; the tables list all.", ""]
    for g in groups:
        attack_params = g.details.get("attack_params", {})
        settings = ", ".join(f"{k} {v}" for k, v in attack_params.items())
        threat = THREATS.get(g.details.get("threat_model"), THREATS["honest-but-curious"])
        lines += [f"## {g.name}", "", f"Attack settings: {settings or 'none'}. Threat model: {threat}.", "",
                  "| file | position | dataset index | true label | recon label | SSIM | PSNR (dB) | MSE |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in g.rows:
            lines.append(
                f"| {r['recon_file']} | {r['position']} | {r['dataset_index']} | {r['true_label']} | {r['recon_label']} "
                f"| {r['ssim']:.4f} | {r['psnr']:.2f} | {r['mse']:.5f} |"
            )
        lines.append("")
    lines += ["## Provenance", "", "```json", json.dumps(provenance, indent=2), "```", ""]
    return "\n".join(lines)
