"""`precode train`: train a model with or without a defense and write RUN_DIR.

RUN_DIR holds model.safetensors (the final weights), run.yaml (the resolved options), history.json
(loss, accuracy and step time per epoch), curves.png, and checkpoints/: epoch-NNNN.safetensors
every --checkpoint-epochs epochs (model files that capture-gradients reads) and resume.safetensors
(weights, optimiser and random state after the last finished epoch, for --resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from defenses import DEFENSE_OPTIONS, defense_names, describe, stack_from_cli
from precode_cli import atomic, budget, data, fileformat, models, plots, training
from precode_cli.cli_support import ProgressBar, now_iso, say, seed_everything, stdout, tool_info
from precode_cli.errors import UserError
from precode_cli.stages import profiles
from precode_cli.outdir import OutputDir

MODEL_FILE, RUN_FILE, HISTORY_FILE, CURVES_FILE = "model.safetensors", "run.yaml", "history.json", "curves.png"
CHECKPOINT_DIR, RESUME_FILE = "checkpoints", "resume.safetensors"
# Options that define a run: --resume refuses to continue a run under different ones.
RUN_DEFINING = (
    "dataset", "data_dir", "image_size", "channels", "stats", "subset", "model", "width", "norm", "defense",
    *DEFENSE_OPTIONS, "optimizer", "lr", "momentum", "weight_decay", "batch_size", "seed",
)


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    """Where the model after `epoch` epochs is kept (epoch 0: the initial weights)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch-{epoch:04d}.safetensors"


def run_train(options: dict[str, Any]) -> list[dict[str, float]]:
    """Train as `options` (the command's resolved options) say; returns the history."""
    budget.set_max_memory(options.get("max_memory"))
    with OutputDir(options["out"]) as out_dir:
        return _run_train(options, out_dir)


def _run_train(options: dict[str, Any], out_dir: OutputDir) -> list[dict[str, float]]:
    out = Path(options["out"])
    resolved = {key: (str(v) if isinstance(v, Path) else v) for key, v in options.items()}
    resolved["defense"] = defense_names(options["defense"])
    if options["data_dir"] is not None:
        resolved["data_dir"] = str(Path(options["data_dir"]).resolve())
    stack = stack_from_cli(options["defense"], **options)
    config = training.TrainConfig(
        epochs=options["epochs"], batch_size=options["batch_size"], optimizer=options["optimizer"], lr=options["lr"],
        momentum=options["momentum"], weight_decay=options["weight_decay"], seed=options["seed"],
    )
    device = training.choose_device(options["device"])
    out_dir.files(CHECKPOINT_DIR, "*.safetensors")  # refuses a symlink planted as checkpoints/ or inside it
    resume_file = out / CHECKPOINT_DIR / RESUME_FILE
    outputs = [out / MODEL_FILE, out / RUN_FILE, out / HISTORY_FILE, out / CURVES_FILE, resume_file]
    stored_state = _resumable_state(resume_file, resolved) if options["resume"] else None
    if stored_state is None:
        if resume_file.exists() and not options["force"]:
            raise UserError(f"{out} holds a training run; add --resume to continue it or --force to start it over.")
        atomic.refuse_overwrite(outputs, options["force"])
    seed_everything(options["seed"])

    source = {key: options[key] for key in ("data_dir", "image_size", "channels", "download")}
    spec = data.with_published_stats(data.data_spec(options["dataset"], **source), options["stats"])
    train_set = data.subset(data.load(options["dataset"], "train", **source), options["subset"])
    test_set = data.load(options["dataset"], "test", **source)
    model_spec = models.make_spec(options["model"], tuple(spec["input_shape"]), spec["num_classes"],
                                  width=options["width"], norm=options["norm"])
    profile = profiles.profile(model_spec, stack.specs(), options["model"])
    budget.require(f"training {options['model']} ({profile.n_params:,} parameters) at batch size {options['batch_size']}",
                   budget.train_bytes(profile, options["batch_size"]), "lower --batch-size")
    if stored_state is not None:
        _check_optimizer_state(stored_state, resume_file, profile, options["optimizer"])
    model = stack.build_model(model_spec, trusted_builder=options["model"])
    trainer = training.Trainer(model, stack.loss, train_set, test_set, spec, config, device,
                               gradient_fn=stack.client_gradients)
    if stored_state is not None:
        trainer.load_state(stored_state.tensors, stored_state.meta["train"])
        if trainer.epoch >= config.epochs:
            raise UserError(f"{out} has already trained {trainer.epoch} epochs; raise --epochs above that to continue.")
    out_dir.lock()  # from here on, no other precode command writes to `out`
    if stored_state is None:
        atomic.refuse_overwrite(outputs, options["force"])  # again: another command may have written meanwhile
        if options["force"]:
            _remove_stale_checkpoints(out_dir)

    tool = tool_info()
    common = {"model": model_spec, "defense": stack.specs(), "data": spec, "tool": tool}
    train_meta = {key: options[key] for key in ("epochs", "batch_size", "optimizer", "lr", "momentum",
                                                 "weight_decay", "seed", "subset")}

    def privacy(trainer: training.Trainer) -> dict[str, Any] | None:
        steps = trainer.epoch * training.steps_per_epoch(len(train_set), config.batch_size)
        return stack.privacy(steps, min(1.0, config.batch_size / len(train_set)))

    def write_model(path: Path, trainer: training.Trainer) -> None:
        meta = {**train_meta, "epoch": trainer.epoch, "created": now_iso()}
        if trainer.history:
            meta["test_accuracy"] = trainer.history[-1]["test_accuracy"]
        if (guarantee := privacy(trainer)) is not None:
            meta["privacy"] = guarantee
        fileformat.write(path, "model", trainer.model.state_dict(), {**common, "train": meta})

    def end_of_epoch(trainer: training.Trainer) -> None:
        out_dir.subdir(CHECKPOINT_DIR)  # created here; a symlink or file put there meanwhile is refused
        if options["checkpoint_every"] and trainer.epoch % options["checkpoint_every"] == 0:
            write_model(checkpoint_path(out, trainer.epoch), trainer)
        tensors, state_meta = trainer.state()
        fileformat.write(resume_file, "training-state", tensors, {
            **common, "train": {**state_meta, "options": resolved},
        })

    if options["checkpoint_every"] and trainer.epoch == 0:
        out_dir.subdir(CHECKPOINT_DIR)
        write_model(checkpoint_path(out, 0), trainer)
    steps = (config.epochs - trainer.epoch) * training.steps_per_epoch(len(train_set), config.batch_size)
    say(f"Training {options['model']} with defense {describe(stack.specs())} on {options['dataset']} "
        f"({len(train_set)} train / {len(test_set)} test images, epochs {trainer.epoch + 1}..{config.epochs}, "
        f"device {device.type}).")
    try:
        with ProgressBar() as bar:
            task = bar.task("training", total=steps)
            history = trainer.run(on_step=task.advance, on_epoch=end_of_epoch)
    except KeyboardInterrupt:
        say(f"Stopped during epoch {trainer.epoch + 1}; `precode train ... --resume` continues from epoch "
            f"{trainer.epoch} ({resume_file}).")
        raise

    write_model(out / MODEL_FILE, trainer)
    run_yaml = yaml.safe_dump(
        {"command": "train", "options": resolved, "model": model_spec, "defense": stack.specs(), "data": spec,
         "tool": tool},
        sort_keys=False,
    )
    atomic.write_text(out / RUN_FILE, run_yaml)
    guarantee = privacy(trainer)
    history_json = {"epochs": history, "test_accuracy": history[-1]["test_accuracy"] if history else None,
                    "privacy": guarantee, "seed": options["seed"], "options": resolved, "tool": tool}
    atomic.write_text(out / HISTORY_FILE, json.dumps(history_json, indent=2) + "\n")
    if history:
        where = f" ({Path(options['data_dir']).name})" if options["data_dir"] else ""
        plots.training_curves(history, out / CURVES_FILE,
                              f"{options['model']} + {describe(stack.specs())} on {options['dataset']}{where}")
    _print_history(history)
    if guarantee is not None:
        say(f"Privacy ({guarantee['defense']}): epsilon = {guarantee['epsilon']:.3g} at delta = {guarantee['delta']:g} "
            f"after {guarantee['steps']} steps at sampling rate {guarantee['sample_rate']:.4g} "
            f"({guarantee['accountant']}).")
    written = [out / MODEL_FILE, out / RUN_FILE, out / HISTORY_FILE] + ([out / CURVES_FILE] if history else [])
    if (out / CHECKPOINT_DIR).is_dir():
        written.append(out / CHECKPOINT_DIR)
    say(f"Wrote {', '.join(str(p) for p in written)}.")
    return history


def _resumable_state(resume_file: Path, resolved: dict[str, Any]) -> fileformat.StoredFile:
    """The stored training state, after checking that it belongs to a run with the same options."""
    if not resume_file.exists():
        raise UserError(f"there is nothing to resume: {resume_file} does not exist; start without --resume.")
    stored = fileformat.read(resume_file, "training-state", profile=profiles.for_files(resolved.get("model")))
    before = stored.meta["train"].get("options", {})
    changed = [key for key in RUN_DEFINING if before.get(key) != resolved.get(key)]
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')} {before.get(k)!r} -> {resolved.get(k)!r}" for k in changed)
        raise UserError(f"--resume continues the run in {resume_file.parent.parent} only with its own options; "
                        f"these differ: {details}.")
    return stored


# What each optimiser keeps per parameter (torch.optim's state_dict slots).
OPTIMIZER_SLOTS = {"adam": ("step", "exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
RNG_NOISE = {"cpu": fileformat.RNG_STATE}  # bytes of a CPU generator's state (CUDA's form varies)


def _check_optimizer_state(stored: fileformat.StoredFile, path: Path, profile: budget.ModelProfile,
                           optimizer: str) -> None:
    """A training state's optimiser slots and random states must fit the model and the optimiser, exactly.

    The schema has checked the metadata and the model's tensors; these tensors are keyed by parameter
    index, so they are checked here against the model's parameters, in order.
    """
    shapes = [list(shape) for shape, _ in profile.params.values()]
    for name, tensor in stored.tensors.items():
        if name.startswith("optimizer."):
            parts = name.split(".")
            valid = len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < len(shapes)
            if not valid or parts[2] not in OPTIMIZER_SLOTS.get(optimizer, ()):
                raise UserError(f"{path} holds optimiser state {name[:60]!r} that {optimizer} on this model does not "
                                "have; start over with --force.")
            want = [] if parts[2] == "step" else shapes[int(parts[1])]
            if list(tensor.shape) != want:
                raise UserError(f"{path} holds optimiser state {name!r} of shape {list(tensor.shape)}, not {want}; "
                                "start over with --force.")
            if parts[2] == "step" and not 0 <= float(tensor) <= 1e12:
                raise UserError(f"{path} holds an optimiser step count out of range; start over with --force.")
    slots = OPTIMIZER_SLOTS.get(optimizer, ())
    present = {name for name in stored.tensors if name.startswith("optimizer.")}
    complete = {f"optimizer.{i}.{slot}" for i in range(len(shapes)) for slot in slots}
    if present and present != complete:
        missing = sorted(complete - present)
        what = f"lacks optimiser state {missing[0]!r}" if missing else "has optimiser state of another optimiser"
        raise UserError(f"{path} {what}; start over with --force.")
    if not present and stored.meta["train"]["epoch"] > 0 and optimizer == "adam":
        raise UserError(f"{path} holds no optimiser state after {stored.meta['train']['epoch']} epochs of adam; "
                        "start over with --force.")
    noise = stored.tensors.get("rng.noise")
    want = RNG_NOISE.get(stored.meta["train"]["device"])
    if noise is not None and want is not None and list(noise.shape) != [want]:
        raise UserError(f"{path} holds a noise generator state of {noise.numel()} bytes, not {want}; "
                        "start over with --force.")


def _remove_stale_checkpoints(out_dir: OutputDir) -> None:
    """--force starts a run over: epoch files of the old run would pass for the new one's."""
    out_dir.remove(CHECKPOINT_DIR, pattern="epoch-*.safetensors")  # never follows a symlink out of RUN_DIR


def _print_history(history: list[dict[str, float]]) -> None:
    from precode_cli.cli_support import plain_row  # numbers only today, but cells are never read as markup

    table = Table(title="training history")
    for column in ("epoch", "train loss", "train acc", "test loss", "test acc", "seconds", "ms/step"):
        table.add_column(column, justify="right")
    for row in history:
        plain_row(
            table, str(row["epoch"]), f"{row['train_loss']:.4f}", f"{row['train_accuracy']:.3f}",
            f"{row['test_loss']:.4f}", f"{row['test_accuracy']:.3f}", f"{row['seconds']:.1f}",
            f"{1000 * row.get('step_seconds_median', 0.0):.1f}",
        )
    stdout.print(table)
