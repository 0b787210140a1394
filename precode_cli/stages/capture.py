"""`precode capture-gradients`: the gradients a client would share, one dump per victim batch.

Beside each dump `<id>.safetensors` goes `<id>.truth.safetensors` with the real images and
labels; only `precode evaluate` reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from defenses import DefenseStack, describe, stack_from_cli
from precode_cli import atomic, data, fileformat, models
from precode_cli.cli_support import ProgressBar, iter_chunks, now_iso, parse_indices, say, seed_everything, tool_info
from precode_cli.errors import UserError
from precode_cli.stages.train import MODEL_FILE


def run_capture(options: dict[str, Any]) -> list[Path]:
    """Capture as `options` say; returns the dump paths written."""
    out = Path(options["out"])
    start, stop = parse_indices(options["indices"])
    seed_everything(options["seed"])
    model, model_spec, stack, spec, source = _client_model(options)
    dataset, data_dir = _victim_source(options, source)
    victims = data.load(dataset, options["split"], Path(data_dir) if data_dir else None)
    if tuple(victims.images.shape[1:]) != tuple(model_spec["input_shape"]):
        raise UserError(f"images of {dataset} have shape {list(victims.images.shape[1:])}, "
                        f"but the model takes {model_spec['input_shape']}.")
    if stop > len(victims):
        raise UserError(f"--indices {start}:{stop} is out of range; the {options['split']} split of {dataset} "
                        f"has {len(victims)} images.")
    batches = list(iter_chunks(start, stop, options["batch_size"]))
    names = [f"{options['split']}-{a:06d}" for a, _ in batches]
    planned = [out / f"{n}.safetensors" for n in names] + [out / f"{n}.truth.safetensors" for n in names]
    atomic.refuse_overwrite(planned, options["force"])

    model.train(options["mode"] == "train")
    names_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(options["seed"])
    tool = tool_info()
    data_meta = {**spec, "dataset": dataset, "data_dir": str(data_dir) if data_dir else None}
    capture_meta = {
        "source": "run" if source else "untrained",
        "run": str(options["run_dir"]) if options.get("run_dir") else None,
        "epoch": source.get("epoch", 0) if source else 0,
        "mode": options["mode"],
        "seed": options["seed"],
        "labels_shared": options["share_labels"],
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "tool": tool,
    }
    written = []
    say(f"Capturing {len(batches)} gradient dump(s) of batch size {options['batch_size']} into {out}.")
    with ProgressBar() as bar:
        task = bar.task("capturing", total=len(batches))
        for name, (a, b) in zip(names, batches):
            images, labels = victims.images[a:b], victims.labels[a:b]
            inputs = data.normalize(images, spec)
            loss = stack.loss(model, model(inputs), labels)
            grads = torch.autograd.grad(loss, [p for _, p in names_params])
            shared = stack.perturb_gradients({n: g for (n, _), g in zip(names_params, grads)}, generator)
            tensors = {f"grad.{n}": g for n, g in shared.items()}
            tensors.update({f"param.{n}": p for n, p in model.named_parameters()})
            tensors.update({f"buffer.{n}": buf for n, buf in model.named_buffers()})
            if options["share_labels"]:
                tensors["labels"] = labels
            dump_path = out / f"{name}.safetensors"
            batch_meta = {**data_meta, "batch_size": b - a}  # the last batch may be smaller
            fileformat.write(dump_path, "gradients", tensors, {
                "model": model_spec, "defense": stack.specs(), "data": batch_meta, "loss": stack.loss_spec(),
                "capture": {**capture_meta, "time": now_iso()},
            })
            fileformat.write(out / f"{name}.truth.safetensors", "truth",
                             {"images": images, "labels": labels, "indices": torch.arange(a, b)}, {
                "data": batch_meta, "dump": {"file": dump_path.name, "sha256": fileformat.sha256_of(dump_path)},
                "indices": [a, b], "split": options["split"], "seed": options["seed"], "tool": tool,
                "created": now_iso(),
            })
            written.append(dump_path)
            task.advance()
    say(f"Wrote {len(written)} dump(s) and their truth files to {out}.")
    return written


def _client_model(options: dict[str, Any]) -> tuple[torch.nn.Module, dict, DefenseStack, dict, dict | None]:
    """The client's model: loaded from RUN_DIR (or a model file), or freshly initialised from the seed."""
    run_dir = options.get("run_dir")
    if run_dir is None:
        stack = stack_from_cli(options["defense"] or "none", options["precode_k"], options["precode_beta"])
        dataset, data_dir = _victim_source(options, None)
        spec = data.data_spec(dataset, data_dir)
        model_spec = models.make_spec(options["model"] or "mlp", tuple(spec["input_shape"]), spec["num_classes"])
        return stack.build_model(model_spec), model_spec, stack, spec, None
    run_dir = Path(run_dir)
    model_file = run_dir / MODEL_FILE if run_dir.is_dir() else run_dir
    stored = fileformat.read(model_file, "model")
    model_spec, defense_specs, spec = stored.meta["model"], stored.meta["defense"], stored.meta["data"]
    if options["model"] and options["model"] != model_spec["name"]:
        raise UserError(f"{model_file} holds a {model_spec['name']} model, but --model {options['model']} was given; "
                        "drop --model when capturing from a run.")
    stack = DefenseStack.from_specs(defense_specs)
    if options["defense"] is not None:
        asked = stack_from_cli(options["defense"], options["precode_k"], options["precode_beta"])
        if [d["name"] for d in asked.specs()] != [d["name"] for d in stack.specs()]:
            raise UserError(f"{model_file} was trained with defense {describe(stack.specs())}, but --defense "
                            f"{options['defense']} was given; drop --defense when capturing from a run.")
    model = stack.build_model(model_spec)
    try:
        model.load_state_dict(stored.tensors, strict=True)
    except RuntimeError as err:
        raise UserError(f"{model_file} does not match its own model spec ({str(err).splitlines()[0]}).") from err
    source = {"dataset": spec["dataset"], "data_dir": spec.get("data_dir"), "epoch": stored.meta["train"].get("epochs", 0)}
    return model, model_spec, stack, spec, source


def _victim_source(options: dict[str, Any], source: dict | None) -> tuple[str, Path | None]:
    """The victims' dataset and folder: as given, else the run's, else the built-in dataset."""
    if options["data_dir"] is not None and options["dataset"] is None and source is None:
        raise UserError("--data-dir needs --dataset (e.g. --dataset imagefolder).")
    dataset = options["dataset"] or (source["dataset"] if source else "builtin")
    data_dir = options["data_dir"]
    if data_dir is None and source is not None and dataset == source["dataset"]:
        data_dir = source.get("data_dir")
    return dataset, (Path(data_dir).resolve() if data_dir else None)

