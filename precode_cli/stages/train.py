"""`precode train`: train a model with or without a defense and write RUN_DIR."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from defenses import stack_from_cli
from precode_cli import atomic, data, fileformat, models, training
from precode_cli.errors import UserError
from precode_cli.cli_support import ProgressBar, stdout, now_iso, say, seed_everything, tool_info

MODEL_FILE, RUN_FILE, HISTORY_FILE = "model.safetensors", "run.yaml", "history.json"


def run_train(options: dict[str, Any]) -> list[dict[str, float]]:
    """Train as `options` (the command's resolved options) say; returns the history."""
    out = Path(options["out"])
    if not options["lr"] > 0:  # also refuses NaN
        raise UserError(f"--lr must be positive, not {options['lr']}.")
    stack = stack_from_cli(options["defense"], options["precode_k"], options["precode_beta"])
    atomic.refuse_overwrite([out / MODEL_FILE, out / RUN_FILE, out / HISTORY_FILE], options["force"])
    seed_everything(options["seed"])
    data_dir = options.get("data_dir")
    data_dir = Path(data_dir).resolve() if data_dir else None
    spec = data.data_spec(options["dataset"], data_dir)
    train_set = data.load(options["dataset"], "train", data_dir)
    test_set = data.load(options["dataset"], "test", data_dir)
    model_spec = models.make_spec(options["model"], tuple(spec["input_shape"]), spec["num_classes"])
    model = stack.build_model(model_spec)
    steps = options["epochs"] * training.steps_per_epoch(len(train_set), options["batch_size"])
    say(f"Training {options['model']} with defense {options['defense']} on {options['dataset']} "
        f"({len(train_set)} train / {len(test_set)} test images, {options['epochs']} epochs).")
    with ProgressBar() as bar:
        task = bar.task("training", total=steps)
        history = training.train(
            model, stack.loss, train_set, test_set, spec, options["epochs"], options["batch_size"],
            options["lr"], options["seed"], on_step=task.advance,
        )
    tool = tool_info()
    train_meta = {key: options[key] for key in ("epochs", "batch_size", "lr", "seed")}
    train_meta.update({"optimizer": "adam", "created": now_iso()})
    if history:
        train_meta["test_accuracy"] = history[-1]["test_accuracy"]
    resolved = {key: (str(v) if isinstance(v, Path) else v) for key, v in options.items()}
    run_yaml = yaml.safe_dump(
        {"command": "train", "options": resolved, "model": model_spec, "defense": stack.specs(), "tool": tool},
        sort_keys=False,
    )
    history_json = json.dumps({"epochs": history, "tool": tool}, indent=2) + "\n"
    fileformat.write(
        out / MODEL_FILE, "model", model.state_dict(),
        {"model": model_spec, "defense": stack.specs(), "data": spec, "train": train_meta, "tool": tool},
    )
    atomic.write_text(out / RUN_FILE, run_yaml)
    atomic.write_text(out / HISTORY_FILE, history_json)
    _print_history(history)
    say(f"Wrote {out / MODEL_FILE}, {out / RUN_FILE} and {out / HISTORY_FILE}.")
    return history


def _print_history(history: list[dict[str, float]]) -> None:
    table = Table(title="training history")
    for column in ("epoch", "train loss", "train acc", "test loss", "test acc", "seconds"):
        table.add_column(column, justify="right")
    for row in history:
        table.add_row(
            str(row["epoch"]), f"{row['train_loss']:.4f}", f"{row['train_accuracy']:.3f}",
            f"{row['test_loss']:.4f}", f"{row['test_accuracy']:.3f}", f"{row['seconds']:.1f}",
        )
    stdout.print(table)
