"""`precode capture-gradients`: the gradients a client would share, one dump per victim batch.

Beside each dump `<id>.safetensors` goes `<id>.truth.safetensors` with the real images and
labels; only `precode evaluate` reads it.

Every batch is computed on the same server model: the weights and buffers are those before any
forward pass, and what a forward pass in train mode does to BatchNorm's running statistics is
undone after each batch. The dump stores that server state, so the running statistics (which a
train-mode forward moves towards the batch's own mean) never leak the batch into the dump.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import typer

from defenses import DEFENSE_OPTIONS, DefenseStack, defense_names, describe, stack_from_cli
from precode_cli import atomic, bn_stats, budget, data, factors, fileformat, models, shards, state_store
from precode_cli.cli_support import GracefulStop, ProgressBar, iter_chunks, now_iso, parse_indices, say, seed_everything, tool_info
from precode_cli.errors import UserError
from precode_cli.limits import MAX_IMPRINT_BINS
from precode_cli.local_training import LocalRecipe, steps_for_epochs
from precode_cli.models import imprint
from precode_cli.stages import client, profiles
from precode_cli.outdir import OutputDir
from precode_cli.stages.train import CHECKPOINT_DIR, MODEL_FILE, checkpoint_path

PICKS = ("first", "random")  # how --indices reads the split


def run_capture(options: dict[str, Any]) -> list[Path]:
    """Capture as `options` say; returns the dump paths written."""
    budget.set_max_memory(options.get("max_memory"))
    with OutputDir(options["out"]) as out_dir:
        return _run_capture(options, out_dir)


def _run_capture(options: dict[str, Any], out_dir: OutputDir) -> list[Path]:
    out = Path(options["out"])
    start, stop = parse_indices(options["indices"])
    pick = str(getattr(options.get("pick"), "value", options.get("pick")) or "first")
    if pick not in PICKS:
        raise UserError(f"--pick must be {' or '.join(PICKS)}, not {pick!r}.")
    seed_everything(options["seed"])
    model, model_spec, stack, spec, source = _client_model(options)
    bn_layers = _bn_layers_to_record(model, model_spec, options)
    dataset, location = _victim_source(options, source)
    victims = data.load(dataset, options["split"], **location, download=options["download"])
    if tuple(victims.images.shape[1:]) != tuple(model_spec["input_shape"]):
        raise UserError(f"images of {dataset} have shape {list(victims.images.shape[1:])}, "
                        f"but the model takes {model_spec['input_shape']}.")
    if stop > len(victims):
        raise UserError(f"--indices {start}:{stop} is out of range; the {options['split']} split of {dataset} "
                        f"has {len(victims)} images.")
    positions = victim_positions(len(victims), start, stop, pick, options["seed"])
    shard = shards.parse(options.get("shard"))
    batches = list(iter_chunks(start, stop, options["batch_size"]))
    if shard is not None:
        batches = shard.take(batches)  # one dump per batch: a batch never spans shards
    names = [f"{options['split']}-{a:06d}" for a, _ in batches]
    version = int(options.get("format_version") or fileformat.VERSIONS["gradients"])
    if not options.get("resume"):
        atomic.refuse_overwrite([out / f"{n}{suffix}" for n in names for suffix in (".safetensors", ".truth.safetensors")],
                                options["force"])
    out_dir.lock(shard)  # from here on, no other precode command writes these files in `out`
    done = _finished(out, names) if options.get("resume") else set()
    planned = [out / f"{n}{suffix}" for n in names if n not in done
               for suffix in (".safetensors", ".truth.safetensors")]
    atomic.refuse_overwrite(planned, options["force"] or bool(options.get("resume")))

    model.train(options["mode"] == "train")
    server_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    server_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    tool = tool_info()
    data_meta = {**spec, "dataset": dataset, **{k: (str(v) if isinstance(v, Path) else v) for k, v in location.items()}}
    capture_meta = {
        "source": "run" if source else "untrained",
        "run": str(Path(options["run_dir"]).resolve()) if options.get("run_dir") else None,
        "epoch": source["epoch"] if source else 0,
        "test_accuracy": source["test_accuracy"] if source else None,
        "mode": options["mode"],
        "seed": options["seed"],
        "labels_shared": options["share_labels"],
        "threat": "imprint" if model_spec.get("imprint") else "honest",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()
                    if k not in ("shard", "resume", "force")},  # the same dump whichever shard wrote it
        "tool": tool,
    }
    _check_same_state(out, sorted(done), state_store.digest(server_params, server_buffers))
    state_sha = None
    if version >= 2 and names:  # also on a --resume with every dump done: a missing or damaged state is rewritten
        state_sha = state_store.store(out_dir, server_params, server_buffers, tool)
    written = []
    recipe = local_recipe(options)
    what = "gradient dump(s)" if recipe is None else f"client update(s) of {recipe.steps} local step(s)"
    todo = [(n, ab) for n, ab in zip(names, batches) if n not in done]
    say(f"Capturing {len(todo)} {what} of batch size {options['batch_size']} into {out}"
        + (f" (shard {shard.index}/{shard.count})" if shard else "")
        + (f"; {len(done)} already done" if done else "") + ".")
    with GracefulStop() as stop, ProgressBar() as bar:
        task = bar.task("capturing", total=len(todo))
        for name, (a, b) in todo:
            if stop():
                say(f"Stopped after {len(written)} dump(s); continue with the same command and --resume.")
                raise typer.Exit(130)
            _seed_batch(options["seed"], a)
            generator = torch.Generator().manual_seed(batch_seed(options["seed"], a))
            chosen = positions[a - start:b - start]  # the victims' real positions in the split
            images, labels = victims.images[chosen], victims.labels[chosen]
            inputs = data.normalize(images, spec)
            recorder = factors.LinearRecorder()
            if recipe is None:
                with (recorder.watching(model) if version >= 2 else contextlib.nullcontext(),
                      bn_stats.watching(model, bn_layers) as bn_inputs):
                    grads = client.shared_gradient(model, stack, inputs, labels, generator)
                stored = recorder.factor(grads) if version >= 2 else grads
                shared = {(n if n.startswith(factors.PREFIX) else f"grad.{n}"): g for n, g in stored.items()}
            else:
                batch_recipe = replace(recipe, num_examples=b - a, batch_size=min(recipe.batch_size, b - a),
                                       steps=recipe_steps(recipe, b - a))
                returned = client.local_training(model, stack, inputs, labels, batch_recipe, generator)
                shared = {f"returned.{n}": w for n, w in returned.items()}
            _restore_buffers(model, server_buffers)
            tensors = dict(shared)
            if bn_layers:  # what the client's update of the running statistics reveals
                tensors.update(_recorded_bn_stats(bn_inputs))
            if state_sha is None:
                tensors.update({f"param.{n}": p for n, p in server_params.items()})
                tensors.update({f"buffer.{n}": buf for n, buf in server_buffers.items()})
            if options["share_labels"]:
                tensors["labels"] = labels
            dump_path = out / f"{name}.safetensors"
            batch_meta = {**data_meta, "batch_size": b - a}  # the last batch may be smaller
            meta = {"model": model_spec, "defense": stack.specs(), "data": batch_meta, "loss": stack.loss_spec(),
                    "capture": {**capture_meta, "time": now_iso()}}
            if state_sha is not None:
                meta["state"] = {"sha256": state_sha}
            if recipe is not None:
                meta["local"] = batch_recipe.to_meta()
            if bn_layers:
                meta["bn_stats"] = {"revealed_by": bn_stats.REVEALED_BY, "variance": bn_stats.VARIANCE,
                                    "layers": bn_layers}
            fileformat.write(dump_path, "gradients" if recipe is None else "update", tensors, meta, version=version)
            fileformat.write(out / f"{name}.truth.safetensors", "truth",
                             {"images": images, "labels": labels, "indices": chosen.clone()}, {
                "data": batch_meta, "dump": {"file": dump_path.name, "sha256": fileformat.sha256_of(dump_path), **(
                    {} if recipe is None else {"content_sha256": fileformat.update_digest(returned)})},
                "indices": [a, b], "pick": pick, "split": options["split"], "seed": options["seed"], "tool": tool,
                "client_model": {key: capture_meta[key] for key in ("source", "epoch", "test_accuracy")},
                "created": now_iso(),
            })
            written.append(dump_path)
            task.advance()
    say(f"Wrote {len(written)} dump(s) and their truth files to {out}.")
    return written


def _bn_layers_to_record(model: torch.nn.Module, model_spec: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """The BatchNorm layers whose batch statistics --record-bn-stats stores ([] without it), refusing a
    capture whose client update would reveal none, before any work."""
    if not options.get("record_bn_stats"):
        return []
    if options["mode"] != "train":
        raise UserError("--record-bn-stats stores the batch statistics BatchNorm uses in train mode, but in --mode "
                        "eval it normalises with the server's running statistics and reveals none; drop one of them.")
    if local_recipe(options) is not None:
        raise UserError("--record-bn-stats stores the statistics of one forward pass, but after several local steps "
                        "the client's BatchNorm update mixes every step's; drop it or --local-steps/--local-epochs.")
    layers = bn_stats.layers(model)
    if not layers:
        raise UserError(f"--record-bn-stats stores BatchNorm statistics, but this {model_spec['name']} model has no "
                        "BatchNorm layer with running statistics; use e.g. --model resnet18 --norm batch.")
    return layers


def _recorded_bn_stats(inputs: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`bn_stats.<layer>.mean/.var` of the one forward pass each layer saw in the client's step."""
    tensors = {}
    for layer, seen in inputs.items():
        if len(seen) != 1:
            raise UserError(f"--record-bn-stats: BatchNorm layer {layer!r} ran {len(seen)} times in the client's "
                            "step, so its update does not reveal one batch's statistics; capture without it.")
        mean_name, var_name = bn_stats.names(layer)
        tensors[mean_name], tensors[var_name] = bn_stats.batch_stats(seen[0].detach())
    return tensors


def batch_seed(seed: int, first: int) -> int:
    """The seed of the batch starting at victim `first`: the same whichever shard or resumed run captures it."""
    digest = hashlib.sha256(f"precode-capture|{seed}|{first}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _seed_batch(seed: int, first: int) -> None:
    """Seed torch's global generator (PRECODE's sampling) for one batch alone."""
    torch.manual_seed(batch_seed(seed, first))


def _check_same_state(out: Path, done: list[str], state_sha: str) -> None:
    """Refuse to --resume into dumps an earlier run captured from another model state (other weights or seed)."""
    for name in done:
        recorded = (fileformat.read_meta(out / f"{name}.safetensors", fileformat.kind_of(out / f"{name}.safetensors",
                                                                                        ("gradients", "update")))
                    .get("state") or {}).get("sha256")
        if recorded is not None and recorded != state_sha:
            raise UserError(f"{out / name}.safetensors was captured from another model state than this command's "
                            "(other weights, model or --seed); --resume only continues the same capture, so "
                            "start over with --force or choose another --out.")


def _finished(out: Path, names: list[str]) -> set[str]:
    """Dumps an earlier run finished: a dump and the truth file that names its exact bytes."""
    done = set()
    for name in names:
        dump, truth = out / f"{name}.safetensors", out / f"{name}.truth.safetensors"
        if dump.is_symlink() or truth.is_symlink():
            raise UserError(f"{dump if dump.is_symlink() else truth} is a symbolic link that precode did not create; "
                            "remove it or start over with --force.")
        if not (dump.is_file() and truth.is_file()):
            continue
        try:
            recorded = fileformat.read_meta(truth, "truth")["dump"]
        except UserError:
            continue  # damaged: captured again
        if recorded.get("file") == dump.name and recorded.get("sha256") == fileformat.sha256_of(dump):
            done.add(name)
    return done


# The recipe fields a server that runs FedAvg sets itself (in Flower: the config it sends to clients).
SERVER_KNOWN = ("optimizer", "lr", "momentum", "weight_decay", "steps", "epochs", "batch_size", "num_examples",
                "shuffle", "labels_per_step")


def local_recipe(options: dict[str, Any]) -> LocalRecipe | None:
    """The FedAvg recipe --local-steps/--local-epochs ask for, or None for a shared gradient (FedSGD)."""
    steps, epochs = options.get("local_steps"), options.get("local_epochs")
    others = [name for name in ("local_lr", "local_batch_size", "momentum", "weight_decay") if options.get(name) is not None]
    if steps is None and epochs is None:
        if others:
            flag = "--" + others[0].replace("_", "-")
            raise UserError(f"{flag} describes local training; add --local-steps N (or --local-epochs E) to capture "
                            "client updates, or drop it to capture gradients.")
        return None
    if steps is not None and epochs is not None:
        raise UserError("--local-steps and --local-epochs both set the length of local training; give one.")
    n = options["batch_size"]
    batch = options.get("local_batch_size") or n
    if batch > n:
        raise UserError(f"--local-batch-size {batch} is larger than the client's {n} example(s) (--batch-size).")
    return LocalRecipe(
        lr=DEFAULT_LOCAL_LR if options.get("local_lr") is None else options["local_lr"],
        steps=steps if steps is not None else steps_for_epochs(epochs, n, batch), epochs=epochs,
        batch_size=batch, num_examples=n,
        momentum=options.get("momentum") or 0.0, weight_decay=options.get("weight_decay") or 0.0,
        shuffle=False, labels_per_step=bool(options["share_labels"]), known=SERVER_KNOWN,
    )


def recipe_steps(recipe: LocalRecipe, examples: int) -> int:
    """Steps for a client with `examples` examples (the last batch of a capture may be smaller)."""
    if recipe.epochs is None:
        return max(recipe.steps, -(-examples // min(recipe.batch_size, examples)))
    return steps_for_epochs(recipe.epochs, examples, min(recipe.batch_size, examples))


DEFAULT_LOCAL_LR = 0.01
THREATS = ("honest", "imprint")
MIN_IMPRINT_BINS = 128


def served_spec(model_spec: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The model the server sends the client: the spec as it is (--threat honest), or with a malicious
    server's imprint module in front (--threat imprint; precode_cli/models/imprint.py)."""
    threat = str(getattr(options.get("threat"), "value", options.get("threat")) or "honest")
    if threat not in THREATS:
        raise UserError(f"--threat must be {' or '.join(THREATS)}, not {threat!r}.")
    bins, measurement = options.get("imprint_bins"), options.get("imprint_measurement")
    if threat == "honest":
        given = "--imprint-bins" if bins is not None else "--imprint-measurement" if measurement is not None else None
        if given:
            raise UserError(f"{given} describes the imprint module of a malicious server; add --threat imprint or "
                            "drop it.")
        return model_spec
    bins = default_imprint_bins(options["batch_size"]) if bins is None else bins
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_IMPRINT_BINS:
        raise UserError(f"--imprint-bins must be a whole number from 2 to {MAX_IMPRINT_BINS}, not {bins!r}.")
    measurement = str(getattr(measurement, "value", measurement) or "random")
    if measurement not in imprint.MEASUREMENTS:
        raise UserError(f"--imprint-measurement must be {' or '.join(imprint.MEASUREMENTS)}, not {measurement!r}.")
    return {**model_spec, "imprint": {"bins": bins, "measurement": measurement, "seed": int(options["seed"])}}


def default_imprint_bins(batch_size: int) -> int:
    """Twice the batch, at least 128: about 60% of a batch of 64 falls alone into a bin (measured in docs/attacks.md)."""
    return min(max(MIN_IMPRINT_BINS, 2 * batch_size), MAX_IMPRINT_BINS)


def victim_positions(n: int, start: int, stop: int, pick: str, seed: int) -> torch.Tensor:
    """Positions in the split of victims START..STOP-1: in the split's order (first), or in an order
    shuffled by `seed` (random), so that e.g. 0:4 of a class-sorted image folder spans the classes."""
    if pick == "first":
        return torch.arange(start, stop)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[start:stop]


def _restore_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Undo what a forward pass did to the buffers (BatchNorm's running statistics)."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[name])


def model_file_of(run_dir: Path, epoch: int | None) -> Path:
    """The model file a RUN_DIR (or file) argument and --epoch stand for."""
    if run_dir.is_dir():
        if epoch is None:
            return run_dir / MODEL_FILE
        chosen = checkpoint_path(run_dir, epoch)
        if not chosen.exists():
            kept = sorted(int(p.stem.split("-")[1]) for p in (run_dir / CHECKPOINT_DIR).glob("epoch-[0-9]*.safetensors"))
            have = f"it keeps epochs {', '.join(map(str, kept))}" if kept else "it keeps no epoch checkpoints (train with --checkpoint-epochs)"
            raise UserError(f"{run_dir} has no checkpoint of epoch {epoch}; {have}.")
        return chosen
    if epoch is not None:
        raise UserError(f"--epoch picks a checkpoint inside a run directory, but {run_dir} is a file; pass the run directory.")
    return run_dir


def _client_model(options: dict[str, Any]) -> tuple[torch.nn.Module, dict, DefenseStack, dict, dict | None]:
    """The client's model: loaded from RUN_DIR (or a model file), or freshly initialised from the seed."""
    run_dir = options.get("run_dir")
    if run_dir is None:
        if options["epoch"] is not None:
            raise UserError("--epoch picks a checkpoint of a run; give the run directory as RUN_DIR.")
        stack = stack_from_cli(options["defense"], **options)
        dataset, location = _victim_source(options, None)
        spec = data.with_published_stats(data.data_spec(dataset, **location, download=options["download"]),
                                         options["stats"])
        name = options["model"] or "mlp"
        model_spec = models.make_spec(name, tuple(spec["input_shape"]), spec["num_classes"],
                                      width=options["width"], norm=options["norm"])
        model_spec = served_spec(model_spec, options)
        _check_budget(model_spec, stack.specs(), options, trusted_builder=name)
        return stack.build_model(model_spec, trusted_builder=name), model_spec, stack, spec, None
    for option in ("width", "norm", "stats"):
        if options[option] is not None:
            raise UserError(f"--{option.replace('_', '-')} describes an untrained model; a run keeps its own, "
                            "so drop it when capturing from RUN_DIR.")
    model_file = model_file_of(Path(run_dir), options["epoch"])
    stored = fileformat.read(model_file, "model", profile=profiles.for_files(options["model"]))
    model_spec, defense_specs, spec = stored.meta["model"], stored.meta["defense"], stored.meta["data"]
    if options["model"] and options["model"] != model_spec["name"]:
        raise UserError(f"{model_file} holds a {model_spec['name']} model, but --model {options['model']} was given; "
                        "drop --model when capturing from a run.")
    stack = DefenseStack.from_specs(defense_specs)
    given = [option for option in DEFENSE_OPTIONS if options.get(option) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} sets a defense parameter, but {model_file} keeps the defense it was trained with "
                        f"({_described_with_params(stack)}); drop {flag} when capturing from a run.")
    if options["defense"] and defense_names(options["defense"]) != [d["name"] for d in stack.specs()]:
        raise UserError(f"{model_file} was trained with defense {describe(stack.specs())}, but --defense "
                        f"{describe([{'name': n} for n in defense_names(options['defense'])])} was given; "
                        "drop --defense when capturing from a run.")
    model_spec = served_spec(model_spec, options)
    _check_budget(model_spec, defense_specs, options, trusted_builder=options["model"])
    model = stack.build_model(model_spec, trusted_builder=options["model"])
    added = {n: t for n, t in model.state_dict().items() if n.startswith(f"{imprint.ATTRIBUTE}.")}  # the server's own
    try:
        model.load_state_dict({**stored.tensors, **added}, strict=True)
    except RuntimeError as err:
        raise UserError(f"{model_file} does not match its own model spec ({str(err).splitlines()[0]}).") from err
    train_meta = stored.meta["train"]
    if options["epoch"] is not None and train_meta.get("epoch") != options["epoch"]:
        raise UserError(f"{model_file} says it holds the model after epoch {train_meta.get('epoch')}, not "
                        f"{options['epoch']} as its name says; the run's checkpoints have been changed.")
    source = {**spec, "epoch": int(train_meta.get("epoch", train_meta.get("epochs", 0))),
              "test_accuracy": train_meta.get("test_accuracy")}  # the loaded file's own: the checkpoint's epoch
    return model, model_spec, stack, spec, source


def _check_budget(model_spec: dict[str, Any], defense_specs: list[dict[str, Any]], options: dict[str, Any],
                  trusted_builder: str | None) -> None:
    """Refuse, before the model is built, a capture that would not fit the memory limit."""
    model = profiles.profile(model_spec, defense_specs, trusted_builder)
    budget.require(f"capturing with {model_spec['name']} ({model.n_params:,} parameters) at batch size "
                   f"{options['batch_size']}", budget.capture_bytes(model, options["batch_size"]),
                   "lower --batch-size" if options["batch_size"] > 1 else None)


def _described_with_params(stack: DefenseStack) -> str:
    """A run's defense with its parameters, for messages: "precode(k=256, beta=0.001, at=classifier)"."""
    parts = [f"{s['name']}({', '.join(f'{k}={v}' for k, v in s['params'].items())})" for s in stack.specs()]
    return "+".join(parts) or "none"


def _victim_source(options: dict[str, Any], source: dict | None) -> tuple[str, dict[str, Any]]:
    """The victims' dataset and where it lives: as given, else the run's, else the built-in dataset."""
    if options["data_dir"] is not None and options["dataset"] is None and source is None:
        raise UserError("--data-dir needs --dataset (e.g. --dataset imagefolder).")
    dataset = options["dataset"] or (source["dataset"] if source else "builtin")
    same = source is not None and dataset == source["dataset"]
    location = {}
    for key in ("data_dir", "image_size", "channels"):
        value = options[key]
        if value is None and same:
            value = source.get(key)
        if value is None and source is not None and key != "data_dir":
            value = source.get(key)  # other victims still have to fit the run's model
        location[key] = value
    if location["data_dir"] is not None:
        location["data_dir"] = Path(location["data_dir"]).resolve()
    return dataset, location
