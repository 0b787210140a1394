"""`precode evaluate`: score reconstructions against their truth files and write a report.

A reconstruction is paired with the truth file whose recorded dump hash equals the hash of the
dump the attack read, so files cannot be mixed up by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from defenses import describe
from precode_cli import atomic, budget, fileformat, metrics, report
from precode_cli.cli_support import now_iso, say, stdout, tool_info
from precode_cli.errors import UserError
from precode_cli.outdir import OutputDir
from precode_cli.stages.attack import TRUTH_SUFFIX

REPORT_FILES = ("metrics.json", "metrics.csv", "grid.png", "ssim_hist.png", "report.md")


def run_evaluate(options: dict[str, Any]) -> dict[str, Any]:
    """Evaluate as `options` say; returns the metrics.json document."""
    budget.set_max_memory(options.get("max_memory"))
    with OutputDir(options["out"]) as out_dir:
        return _run_evaluate(options, out_dir)


def _run_evaluate(options: dict[str, Any], out_dir: OutputDir) -> dict[str, Any]:
    out = Path(options["out"])
    threshold = float(options["threshold"])
    if not 0 <= threshold <= 1:  # also refuses NaN
        raise UserError(f"--threshold must be between 0 and 1, not {threshold}.")
    space = options.get("space", "pixel")
    if space not in metrics.SPACES:
        raise UserError(f"unknown --space {space!r}; choose one of: {', '.join(metrics.SPACES)}.")
    atomic.refuse_overwrite([out / name for name in REPORT_FILES], options["force"])
    lpips_model = None
    if options.get("lpips_weights") is not None:
        from precode_cli.lpips import load_lpips

        lpips_model = load_lpips(Path(options["lpips_weights"]))
    truth_by_dump = _index_truth(options["truth"])
    groups = [_score_group(Path(d), truth_by_dump, threshold, space, lpips_model) for d in options["recon_dirs"]]
    provenance = {
        "tool": tool_info(),
        "created": now_iso(),
        "recon_dirs": [str(d) for d in options["recon_dirs"]],
        "truth_dirs": [str(d) for d in options["truth"]],
    }
    out_dir.lock()  # from here on, no other precode command writes to `out`
    atomic.refuse_overwrite([out / name for name in REPORT_FILES], options["force"])  # again, under the lock
    document = report.write_all(out, groups, threshold, provenance, note=options.get("note"), space=space)
    _print_table(groups, threshold)
    say(f"Wrote {', '.join(str(out / n) for n in REPORT_FILES)}.")
    return document


def _index_truth(truth_dirs: list[Path]) -> dict[str, Path]:
    """Every truth file under the --truth directories, keyed by the SHA-256 of its dump."""
    index: dict[str, Path] = {}
    for directory in truth_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"--truth {directory} is not a directory; give the GRADS_DIR that capture-gradients wrote.")
        found = sorted(directory.glob(f"*{TRUTH_SUFFIX}"))
        if not found:
            raise UserError(f"--truth {directory} holds no truth files (*{TRUTH_SUFFIX}).")
        for path in found:
            stored = fileformat.read(path, "truth")
            index[stored.meta["dump"]["sha256"]] = path
    return index


def _score_group(recon_dir: Path, truth_by_dump: dict[str, Path], threshold: float, space: str,
                 lpips_model: Any = None) -> report.Group:
    if not recon_dir.is_dir():
        raise UserError(f"{recon_dir} is not a directory; give the RECON_DIR that `precode attack` wrote.")
    files = sorted(recon_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{recon_dir} holds no reconstructions (*.safetensors); run `precode attack` first.")
    tables = [fileformat.tensor_table(path, "reconstruction") for path in files]  # headers only
    images = sum(math.prod(table["images"][1]) for table in tables if "images" in table)
    budget.require(f"scoring the {len(files)} reconstructions in {recon_dir}", 2 * 4 * images,
                   "evaluate fewer reconstructions at once")
    seen: dict[str, Path] = {}
    for path in files:  # one reconstruction per dump: two would count one victim twice
        sha = fileformat.read_meta(path, "reconstruction")["source"]["sha256"]
        if sha in seen:
            raise UserError(f"{path} and {seen[sha]} reconstruct the same dump; keep one reconstruction per dump "
                            "in a RECON_DIR.")
        seen[sha] = path
    group: report.Group | None = None
    for path in files:
        try:
            group = _score_file(path, recon_dir, truth_by_dump, threshold, space, lpips_model, group)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
            raise UserError(f"{path} has metadata or tensors this precode cannot use ({type(err).__name__}: "
                            f"{str(err)[:120]}); run the attack again.") from err
    assert group is not None
    return group


def _score_file(path: Path, recon_dir: Path, truth_by_dump: dict[str, Path], threshold: float, space: str,
                lpips_model: Any, group: report.Group | None) -> report.Group:
    """Score one reconstruction file into `group` (created from the first file)."""
    recon = fileformat.read(path, "reconstruction")
    meta = recon.meta
    truth_path = truth_by_dump.get(meta["source"]["sha256"])
    if truth_path is None:
        raise UserError(f"no truth file under --truth belongs to {path} (its dump was {meta['source']['file']}); "
                        "pass the GRADS_DIR the dump came from.")
    truth = fileformat.read(truth_path, "truth")
    fields = ("input_shape", "num_classes", "batch_size", "mean", "std")
    differ = [key for key in fields if meta["data"].get(key) != truth.meta["data"].get(key)]
    if differ:
        raise UserError(f"{path} and its truth file {truth_path} disagree on data.{differ[0]}; they do not "
                        "describe the same victims.")
    images, originals = recon.tensors["images"], truth.tensors["images"]
    if images.shape != originals.shape:
        raise UserError(f"{path} holds images of shape {list(images.shape)}, but {truth_path} "
                        f"holds {list(originals.shape)}.")
    if group is None:
        group = _new_group(recon_dir, meta)
        group.details["model_state"], group.details["test_accuracy"] = _client_model_state(truth.meta)
    elif _new_group(recon_dir, meta).name != group.name:
        raise UserError(f"{recon_dir} mixes reconstructions of different models, defenses or attacks "
                        f"({path.name} differs from the first); keep one attack run per RECON_DIR.")
    order = metrics.match_batch(images, originals) if images.shape[0] > 1 else [0]
    images, recon_labels = images[order], recon.tensors["labels"][order]
    scores = metrics.per_image(images, originals, space, meta["data"])
    if lpips_model is not None:
        from precode_cli.lpips import lpips_distance

        scores["lpips"] = lpips_distance(lpips_model, images, originals)
    indices = truth.tensors["indices"].tolist()
    for i in range(images.shape[0]):
        true_label = int(truth.tensors["labels"][i])
        recon_label = int(recon_labels[i])
        group.rows.append({
            "group": group.name, "recon_file": path.name, "position": i, "matched_position": order[i],
            "dataset_index": indices[i],
            "true_label": true_label, "recon_label": recon_label,
            "true_class": _class_name(truth.meta["data"], true_label),
            "ssim": float(scores["ssim"][i]), "psnr": float(scores["psnr"][i]), "mse": float(scores["mse"][i]),
            "success": float(scores["ssim"][i]) >= threshold,
            **({"lpips": float(scores["lpips"][i])} if "lpips" in scores else {}),
        })
        group.originals.append(originals[i])
        group.reconstructions.append(images[i])
    return group


def _client_model_state(truth_meta: dict[str, Any]) -> tuple[str, float | None]:
    """Whether the attacked model was untrained or trained (and its test accuracy), from the truth file alone.

    Capture records the model it used in each truth file (`client_model`); evaluate opens no other
    path that a file names. Truth files from before that record say "unknown".
    """
    client = truth_meta.get("client_model")
    if client is None:
        return "unknown", None
    if client["source"] == "untrained":
        return "untrained", None
    return f"epoch {client['epoch']}", client.get("test_accuracy")


def _class_name(spec: dict[str, Any], label: int) -> str | None:
    names = spec.get("class_names") or []
    return names[label] if 0 <= label < len(names) else None


def _new_group(recon_dir: Path, meta: dict[str, Any]) -> report.Group:
    defense = describe(meta["defense"])
    attack = meta["attack"]
    details = {"model": meta["model"]["name"], "defense": defense, "attack": attack["name"],
               "attack_params": attack["params"], "seed": attack["seed"]}
    return report.Group(name=f"{details['model']} + {defense}, {attack['name']} ({recon_dir.name})",
                        recon_dir=str(recon_dir), details=details)


def _print_table(groups: list[report.Group], threshold: float) -> None:
    from precode_cli.cli_support import plain_row  # folder and model names come from users and files: plain text

    table = Table(title=f"evaluation (ASR: SSIM >= {threshold:g})")
    for column in ("reconstructions", "model", "defense", "attack", "n", "mean SSIM", "mean PSNR", "mean MSE",
                   "mean LPIPS", "ASR", "label acc", "test acc"):
        table.add_column(column, justify="left" if column in ("reconstructions", "model", "defense", "attack") else "right")
    for g in groups:
        s = g.summary(threshold)
        plain_row(table, g.recon_dir, g.details["model"], g.details["defense"], g.details["attack"], str(s["n"]),
                  f"{s['mean_ssim']:.4f}", f"{s['mean_psnr']:.2f}", f"{s['mean_mse']:.5f}",
                  f"{s['mean_lpips']:.4f}" if "mean_lpips" in s else "-", f"{s['asr']:.2f}",
                  f"{s['label_accuracy']:.2f}", report.accuracy_text(g.details))
    stdout.print(table)
