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
    distinguish_groups(groups)  # two groups must never share a name: the report and plots key on it
    document = report.write_all(out, groups, threshold, provenance, note=options.get("note"), space=space)
    _print_table(groups, threshold)
    say(f"Wrote {', '.join(str(out / n) for n in REPORT_FILES)}.")
    return document


def _index_truth(truth_dirs: list[Path]) -> dict[str, Path]:
    """Every truth file under the --truth directories, keyed by the SHA-256 of its dump (and, for a client
    update, by the digest of the weights the client sent back)."""
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
            content = stored.meta["dump"].get("content_sha256")
            if content:  # an update's returned weights: how a truth file written by a Flower client names it
                index.setdefault(content, path)
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
    if truth_path is None and meta["source"].get("content_sha256"):
        truth_path = truth_by_dump.get(meta["source"]["content_sha256"])
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
               "attack_params": attack["params"], "seed": attack["seed"],
               "threat_model": attack.get("threat_model") or "honest-but-curious"}  # older files: the only one then
    return report.Group(name=f"{details['model']} + {defense}, {attack['name']} ({recon_dir.name})",
                        recon_dir=str(recon_dir), details=details)


LABEL_MAX = 32  # widest folder label in the table; longer ones keep their end: "…/sweep/cnn-precode"


def group_labels(recon_dirs: list[str], width: int = LABEL_MAX) -> list[str]:
    """Labels that tell the RECON_DIRs apart in at most `width` characters.

    A path as given when it fits, else its shortest ending that no other folder shares
    (/data/sweep-a/recon and /data/sweep-b/recon: sweep-a/recon, sweep-b/recon), cut from the left
    behind "…" if even that is too long. A folder named twice gets #1, #2 after its label.
    """
    given = _numbered([str(d) for d in recon_dirs])
    endings = unique_endings(recon_dirs)
    return _fitted_labels([g if len(g) <= width else e for g, e in zip(given, endings)], width)


def unique_endings(recon_dirs: list[str]) -> list[str]:
    """Each folder's shortest path ending that no other folder shares: x/a/r, x/b/r, r1 give a/r, b/r, r1."""
    parts = [Path(d).parts or (str(d),) for d in recon_dirs]
    labels = []
    for i, mine in enumerate(parts):
        others = [theirs for j, theirs in enumerate(parts) if j != i and theirs != mine]
        k = next((k for k in range(1, len(mine) + 1) if all(theirs[-k:] != mine[-k:] for theirs in others)),
                 len(mine))
        labels.append(str(Path(*mine[-k:])))
    return _numbered(labels)


def _numbered(labels: list[str]) -> list[str]:
    """Labels that occur more than once get their group's number: "r #1", "r #3"."""
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _shorten(label: str, width: int) -> str:
    """`label` cut from the left to `width` characters, "…" marking the cut: the folder's own name stays."""
    return label if len(label) <= width else "…" + label[len(label) - width + 1:]


def _fitted_labels(labels: list[str], width: int) -> list[str]:
    short = [_shorten(label, width) for label in labels]
    if len(set(short)) == len(short):
        return short
    return [s if short.count(s) == 1 else _shorten(label, width - len(f" #{i + 1}")) + f" #{i + 1}"
            for i, (s, label) in enumerate(zip(short, labels))]


def distinguish_groups(groups: list[report.Group]) -> None:
    """Give groups whose names collide (same model, defense, attack and folder name) the label of their folder."""
    names = [g.name for g in groups]
    if len(set(names)) == len(names):
        return
    for g, label in zip(groups, unique_endings([g.recon_dir for g in groups])):
        if names.count(g.name) > 1:
            g.name = f"{g.details['model']} + {g.details['defense']}, {g.details['attack']} ({label})"
            for row in g.rows:
                row["group"] = g.name


def _print_table(groups: list[report.Group], threshold: float) -> None:
    """The comparison table on stdout: one row per group when it fits the console, else one block per group.

    Every cell prints whole. Only a folder label longer than the space for it is shortened from the
    left, behind "…" (LABEL_MAX in the table).
    """
    from rich import box
    from rich.cells import cell_len
    from rich.text import Text

    width = stdout.width
    lpips = any("mean_lpips" in g.summary(threshold) for g in groups)
    title = f"evaluation (ASR: SSIM >= {threshold:g})"
    rows = [_cells(g, threshold, lpips) for g in groups]
    headers = ["folder", "model", "defense", "attack", "n", "mean SSIM", "mean PSNR", "mean MSE",
               *(["mean LPIPS"] if lpips else []), "ASR", "label acc", "test acc"]
    labels = group_labels([g.recon_dir for g in groups], LABEL_MAX)
    body = [max(cell_len(label) for label in labels)] + [max(cell_len(r[c]) for r in rows)
                                                         for c in range(len(headers) - 1)]
    for header_width in (len, lambda h: max(len(word) for word in h.split())):  # headers on one line, else folded
        widths = [max(b, header_width(h)) for b, h in zip(body, headers)]
        if sum(widths) + 3 * len(widths) + 1 <= width:  # each column: its padding and a border, plus the last border
            table = Table(title=title, box=box.HEAVY_HEAD)
            for header, column_width in zip(headers, widths):
                table.add_column(header, width=column_width,
                                 justify="left" if header in ("folder", "model", "defense", "attack") else "right")
            for label, cells in zip(labels, rows):
                table.add_row(Text(label), *(Text(cell) for cell in cells))
            stdout.print(table)
            return
    _print_blocks(groups, threshold, rows, headers[1:], title, width)


def _cells(g: report.Group, threshold: float, lpips: bool) -> list[str]:
    """A group's cells after the folder: model, defense, attack, then the means and rates."""
    s = g.summary(threshold)
    return [g.details["model"], g.details["defense"], g.details["attack"], str(s["n"]),
            f"{s['mean_ssim']:.4f}", f"{s['mean_psnr']:.2f}", f"{s['mean_mse']:.5f}",
            *([f"{s['mean_lpips']:.4f}" if "mean_lpips" in s else "-"] if lpips else []), f"{s['asr']:.2f}",
            f"{s['label_accuracy']:.2f}", report.accuracy_text(g.details)]


def _print_blocks(groups: list[report.Group], threshold: float, rows: list[list[str]], headers: list[str],
                  title: str, width: int) -> None:
    """The narrow layout: per group its folder, then "name value" pairs wrapped between pairs, never inside one.

        evaluation (ASR: SSIM >= 0.6)
        cnn-plain  model cnn (epoch 2, test acc 98.9%) · defense none · attack ig
                   n 4 · mean SSIM 0.2134 · mean PSNR 14.02 · mean MSE 0.04121 · ASR 0.00
                   label acc 1.00

    A folder label longer than a fifth of the width goes on a line of its own above its group's lines.
    """
    from rich.text import Text

    labels = group_labels([g.recon_dir for g in groups], width)
    beside = max(len(label) for label in labels) <= max(8, width // 5)  # short labels: beside their group
    label_width = max(len(label) for label in labels) if beside else 0
    room = max(20, width - label_width - 2)
    lines = [title]
    for i, (g, label, cells) in enumerate(zip(groups, labels, rows)):
        state = g.details.get("model_state") or "unknown"
        if g.details.get("test_accuracy") is not None:
            state += f", test acc {100 * g.details['test_accuracy']:.1f}%"
        pairs = [f"{h} {c}" for h, c in zip(headers, cells)]
        block = (_packed([f"model {cells[0]} ({state})", *pairs[1:3]], room)
                 + _packed(pairs[3:-1], room))  # the means and rates; test acc is in the model's pair
        if beside:
            lines += [""] * bool(i) + [f"{label if j == 0 else '':<{label_width}}  {text}"
                                       for j, text in enumerate(block)]
        else:  # long labels: on a line of their own, the group's lines indented below
            lines += [""] * bool(i) + [label] + [f"  {text}" for text in block]
    for line in lines:
        stdout.print(Text(line))


def _packed(pairs: list[str], room: int, separator: str = " · ") -> list[str]:
    """`pairs` joined by `separator` into lines of at most `room` characters where they allow."""
    lines: list[str] = []
    for pair in pairs:
        if lines and len(lines[-1]) + len(separator) + len(pair) <= room:
            lines[-1] += separator + pair
        else:
            lines.append(pair)
    return lines
