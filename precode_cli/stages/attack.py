"""`precode attack`: reconstruct the victims behind gradient dumps. Never opens a truth file.

The server's view is rebuilt from each dump alone: the architecture and defense from its metadata,
the weights and buffers from its `param.*` and `buffer.*` tensors, the shared gradient from
`grad.*`, and the labels when the client shared them.

Dumps of the same architecture, defense and batch size are attacked together, `--vectorize` at a
time, by the attacks that can (the Inverting Gradients family); the others take them one by one.
Every `--checkpoint-iterations` iterations a group's state goes to RECON_DIR/checkpoints/, and Ctrl-C or
SIGTERM writes a checkpoint and the reconstructions so far (marked incomplete); `--resume` goes on
from there and skips the dumps already done.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import typer
from rich.table import Table

import attacks
from attacks.base import AttackResult, AttackTarget
from attacks.optimization import MatchState
from defenses import DefenseStack
from precode_cli import atomic, bn_stats, budget, data, fileformat, shards
from precode_cli.cli_support import GracefulStop, ProgressBar, now_iso, say, stdout, tool_info, tune_allocator
from precode_cli.errors import UserError
from precode_cli.local_training import LocalRecipe, pseudo_gradient
from precode_cli.stages import profiles
from precode_cli.outdir import OutputDir

TRUTH_SUFFIX = ".truth.safetensors"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class Dump:
    """One gradient dump and where its reconstruction goes."""

    path: Path
    out: Path
    sha256: str
    group: str  # dumps with the same group can be attacked in one vectorised run
    kind: str = "gradients"  # or "update": a FedAvg client's reply
    content_sha256: str | None = None  # an update's fileformat.update_digest, which client-side truth files name


def dump_paths(inputs: list[Path]) -> list[Path]:
    """The dumps named on the command line; a directory stands for every dump in it (truth files skipped)."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.glob("*.safetensors") if not p.name.endswith(TRUTH_SUFFIX))
            if not found:
                raise UserError(f"{item} holds no gradient dumps (*.safetensors); run `precode capture-gradients` first.")
            paths.extend(found)
        else:
            paths.append(item)
    return paths


DUMP_KINDS = ("gradients", "update")


def read_dump(path: Path, trusted_builder: str | None = None) -> fileformat.StoredFile:
    """A gradient dump or a client update, validated: whichever kind the file declares."""
    kind = fileformat.kind_of(path, DUMP_KINDS)
    return fileformat.read(path, kind, profile=profiles.for_files(trusted_builder))


# Models built from shared states (format version 2), by group and state hash: every dump of a group
# computed on one state attacks the same model object instead of a copy each (see `_model_for`).
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def target_from_dump(stored: fileformat.StoredFile, path: Path, trusted_builder: str | None = None,
                     models: dict[tuple[str, str], torch.nn.Module] | None = None) -> AttackTarget:
    """The server's view of one dump: model at capture, client loss, shared gradient, shared labels.

    `trusted_builder` is the user's --trust-builder: a dump naming a user's own builder is rebuilt only then.
    Every refusal names the dump (an attack may read hundreds), and metadata of the wrong shape is a
    refusal too, never a crash.
    """
    try:
        return _target_from_dump(stored, path, trusted_builder, models)
    except UserError as err:
        if str(path) in str(err):
            raise
        raise UserError(f"{path}: {err}") from err
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        raise UserError(f"{path} has metadata this precode cannot use ({type(err).__name__}: {str(err)[:120]}); "
                        "capture the dump again.") from err


def _target_from_dump(stored: fileformat.StoredFile, path: Path, trusted_builder: str | None,
                      models: dict[tuple[str, str], torch.nn.Module] | None) -> AttackTarget:
    meta = stored.meta
    recipe = LocalRecipe.from_meta(meta["local"]) if stored.kind == "update" else None
    stack = DefenseStack.from_specs(meta["defense"])
    key = (_group_of(meta), meta["state"]["sha256"]) if meta.get("state") and models is not None else None
    model = models.get(key) if key is not None else None
    if model is None:
        model = stack.build_model(meta["model"], trusted_builder=trusted_builder)
        state = {**stored.prefixed("param"), **stored.prefixed("buffer")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise UserError(f"{path} does not match the model its metadata describes ({str(err).splitlines()[0]}).") from err
        model.train(meta["capture"].get("mode", "train") == "train")
        for p in model.parameters():
            p.requires_grad_(True)
        if key is not None:
            models.clear()  # one group's model at a time: groups come one after another
            models[key] = model
    named = dict(model.named_parameters())
    if recipe is None:
        grads = stored.prefixed("grad")
    else:
        returned = stored.prefixed("returned")
        if set(returned) != set(named):
            odd = sorted(set(returned) ^ set(named))[:3]
            raise UserError(f"{path} has returned weights that do not match its model's parameters ({odd}).")
        grads = pseudo_gradient({n: p.detach() for n, p in named.items()}, returned, recipe)
    names = [n for n in named if n in grads]
    missing = [n for n in named if n not in grads]
    unexpected = [n for n in grads if n not in named]
    if missing or unexpected:
        raise UserError(f"{path} has gradients that do not match its model's parameters "
                        f"(missing: {missing[:3]}, unexpected: {unexpected[:3]}).")
    for n in names:
        if grads[n].shape != named[n].shape:
            raise UserError(f"{path}: gradient {n!r} has shape {list(grads[n].shape)}, "
                            f"the parameter has {list(named[n].shape)}.")
    spec = meta["data"]
    batch_size = int(spec.get("batch_size", 1))
    labels = stored.tensors.get("labels")
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != (batch_size,)):
        raise UserError(f"{path} has labels of dtype {labels.dtype} and shape {list(labels.shape)}; "
                        f"expected int64 of shape [{batch_size}].")
    shape = tuple(meta["model"]["input_shape"])
    return AttackTarget(
        model=model, loss_fn=stack.loss, param_names=names, shared_grads=[grads[n] for n in names], labels=labels,
        batch_size=batch_size, input_shape=shape, num_classes=int(meta["model"]["num_classes"]),
        lower=data.normalize(torch.zeros(1, shape[0], 1, 1), spec),
        upper=data.normalize(torch.ones(1, shape[0], 1, 1), spec),
        local=recipe if recipe is not None and not recipe.single_sgd_step else None,
        bn_stats=bn_stats.split(stored.prefixed("bn_stats")) or None,
    )


def _group_of(meta: dict[str, Any], weights: str | None = None) -> str:
    """What dumps must share to be attacked in one vectorised run: the architecture, defense and data, and
    the weights: a format-2 dump's header names its shared state; a version-1 dump's own weights give
    `weights`, their digest, once the dump is read (the shard plan, from headers alone, goes without).
    Victims of other weights (other epochs or rounds) then form chunks of their own, each as fast per
    victim as the victims alone; mixed in one chunk, a large model's victims were up to 40% slower
    (docs/performance.md)."""
    spec = meta["data"]
    state = (meta.get("state") or {}).get("sha256") or weights
    return json.dumps([meta["model"], meta["defense"], meta["loss"], meta["capture"].get("mode", "train"),
                       spec.get("batch_size", 1), spec["mean"], spec["std"], meta.get("local"), state],
                      sort_keys=True)


def _weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a version-1 dump's own model state (its `param.*` and `buffer.*` tensors)."""
    digest = hashlib.sha256()
    for name in sorted(n for n in tensors if n.startswith(("param.", "buffer."))):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _parse_layers(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def run_attack(options: dict[str, Any]) -> list[Path]:
    """Attack every dump as `options` say; returns the reconstruction paths written."""
    budget.set_max_memory(options.get("max_memory"))
    if options.get("threads"):
        if not 1 <= int(options["threads"]) <= 1024:
            raise UserError(f"--threads must be between 1 and 1024, not {options['threads']}.")
        torch.set_num_threads(int(options["threads"]))
    _MODELS.clear()
    try:
        with OutputDir(options["out"]) as out_dir:
            return _run_attack(options, out_dir)
    finally:
        _MODELS.clear()


def _run_attack(options: dict[str, Any], out_dir: OutputDir) -> list[Path]:
    out = Path(options["out"])
    attack = attacks.create(
        options["method"], iterations=options["iterations"], lr=options["lr"], tv_weight=options["tv_weight"],
        preset=options.get("preset"), restarts=options.get("restarts"), init=options.get("init"),
        ignore_layers=_parse_layers(options.get("ignore_layers")), patience=options.get("patience"),
        min_improvement=options.get("min_improvement"), bn_weight=options.get("bn_weight"),
    )
    if options["vectorize"] < 1:
        raise UserError(f"--vectorize must be at least 1, not {options['vectorize']}.")
    paths = dump_paths(options["dumps"])
    truth_files = [path for path in paths if path.name.endswith(TRUTH_SUFFIX)]
    if truth_files:  # `grads/*.safetensors` names them too; skipped by name, so never opened
        paths = [path for path in paths if not path.name.endswith(TRUTH_SUFFIX)]
        if not paths:
            raise UserError(f"{truth_files[0]} is a truth file, and no gradient dump was given; the attack reads only "
                            "gradient dumps (<id>.safetensors beside it).")
        say(f"Skipped {len(truth_files)} truth file(s) (*{TRUTH_SUFFIX}): the attack never opens them.")
    shard = shards.parse(options.get("shard"))
    if shard is not None:
        paths = _shard_paths(paths, shard, attack, options)
        if not paths:
            say(f"Shard {shard.index}/{shard.count} has no dumps to attack (more shards than units of work).")
            return []
    outs = [out / path.name for path in paths]
    if len(set(outs)) != len(outs):
        raise UserError("two dumps have the same file name; attack them into separate --out directories.")
    if {p.resolve() for p in outs} & {p.resolve() for p in paths}:
        raise UserError(f"--out {out} is where the dumps are; reconstructions would replace them, so choose another --out.")
    dumps = []
    group_meta: dict[str, dict[str, Any]] = {}
    for path, target_path in zip(paths, outs):  # validate every dump before any work
        stored = read_dump(path, options.get("model"))
        attack.check(target_from_dump(stored, path, options.get("model"), _MODELS))  # e.g. ig-adaptive without PRECODE
        content = fileformat.update_digest(stored.prefixed("returned")) if stored.kind == "update" else None
        weights = None if stored.meta.get("state") else _weights_digest(stored.tensors)
        dumps.append(Dump(path, target_path, fileformat.sha256_of(path), _group_of(stored.meta, weights), stored.kind,
                          content))
        group_meta.setdefault(dumps[-1].group, stored.meta)
        del stored
    _check_budget(dumps, group_meta, attack, options)
    mine = {path.name for path in paths}  # a shard's checkpoints are named after its own dumps

    def own_checkpoints() -> list[Path]:
        found = out_dir.files(CHECKPOINT_DIR, "*.safetensors")
        return found if shard is None else [c for c in found if c.name in mine]

    if options["resume"]:
        out_dir.files(CHECKPOINT_DIR, "*.safetensors")  # a planted symlink is refused before anything is created
        out_dir.lock(shard)  # from here on, no other precode command writes these files: its checkpoints are this run's
        _check_resumable(out, dumps, attack, options["seed"], options.get("model"))
        pending = [d for d in dumps if not _finished(d)]
    else:
        atomic.refuse_overwrite(outs + own_checkpoints(), options["force"])
        out_dir.lock(shard)  # from here on, no other precode command writes these files
        atomic.refuse_overwrite(outs + own_checkpoints(), options["force"])  # again, under the lock
        pending = dumps
    tune_allocator()
    rows: list[tuple[str, float, str, float]] = []
    iterations = getattr(attack, "iterations", 1)
    say(f"Attacking {len(pending)} dump(s) with {options['method']}"
        + (f" ({len(dumps) - len(pending)} already done)" if len(pending) < len(dumps) else "") + ".")
    with GracefulStop() as stop, ProgressBar() as bar:
        overall = bar.task("dumps", total=len(pending))
        current = bar.task("", total=iterations)
        for chunk in _plan(pending, attack, options):
            if stop():
                break
            current.restart(f"{chunk[0].path.name}" + (f" +{len(chunk) - 1}" if len(chunk) > 1 else ""))
            started = time.perf_counter()
            results, state = _attack_chunk(attack, chunk, options, current.set, stop)
            seconds = (time.perf_counter() - started) / len(chunk)
            for dump, result in zip(chunk, results):
                if len(result.loss_trace) == 0:
                    continue  # stopped before the first iteration: nothing worth writing but the checkpoint
                _write_reconstruction(dump, result, attack, options, seconds, complete=state is None)
                rows.append((dump.path.name, float(result.loss_trace[-1]), result.label_source, seconds))
            checkpoint = _checkpoint_path(out, chunk)
            if state is not None:
                _write_checkpoint(checkpoint, chunk, attack, options, state)
                _print_summary(rows)
                say(f"Stopped at iteration {state.step} of {iterations}; wrote a checkpoint to {checkpoint} and the "
                    f"reconstructions so far (marked incomplete). Continue with the same command and --resume.")
                raise typer.Exit(130)
            # never through a symlink; the folder stays while other shards may be writing into it
            out_dir.remove(CHECKPOINT_DIR, names=[checkpoint.name], drop_if_empty=shard is None)
            overall.advance(len(chunk))
    if stop():
        _print_summary(rows)
        say("Stopped between dumps; continue with the same command and --resume.")
        raise typer.Exit(130)
    _print_summary(rows)
    say(f"Wrote {len(rows)} reconstruction(s) to {out}.")
    return outs


def _check_budget(dumps: list[Dump], group_meta: dict[str, dict[str, Any]], attack: attacks.Attack,
                  options: dict[str, Any]) -> None:
    """Refuse, before any work, a group of dumps whose attack would not fit the memory limit."""
    vectorised = getattr(attack, "vectorised", False)
    restarts = int(attack.params().get("restarts", 1) or 1)
    for group, meta in group_meta.items():
        members = sum(1 for d in dumps if d.group == group)
        together = min(members, options["vectorize"]) if vectorised else 1
        model = profiles.profile(meta["model"], meta["defense"], options.get("model"))
        batch = meta["data"]["batch_size"]
        lower = "lower --vectorize" if together > 1 else ("lower --restarts" if restarts > 1 else None)
        needed = budget.attack_bytes(model, batch, together, restarts)
        local = meta.get("local")
        if local and local["steps"] > 1:  # the replay keeps every local step's graph
            linear_only = not model.buffers and all(len(shape) <= 2 for shape, _ in model.params.values())
            needed = budget.unrolled_attack_bytes(model, local["batch_size"], together, restarts, local["steps"],
                                                  factored=linear_only and not local["weight_decay"])
        budget.require(f"attacking {together} dump(s) of {meta['model']['name']} (batch {batch}, "
                       f"{model.n_params:,} parameters) at once", needed, lower)


def _plan(pending: list[Dump], attack: attacks.Attack, options: dict[str, Any]) -> list[list[Dump]]:
    """Chunks of dumps to attack together: those of a saved checkpoint first, then groups of --vectorize."""
    if not getattr(attack, "vectorised", False):
        return [[d] for d in pending]
    chunks, left = [], list(pending)
    if options["resume"]:
        for checkpoint in OutputDir(options["out"]).files(CHECKPOINT_DIR, "*.safetensors"):
            meta = fileformat.read_meta(checkpoint, "attack-state")
            sources = [(s["file"], s["sha256"]) for s in meta["sources"]]
            chunk = [d for name, sha in sources for d in left if (d.path.name, d.sha256) == (name, sha)]
            if len(chunk) == len(sources):
                chunks.append(chunk)
                left = [d for d in left if d not in chunk]
    return chunks + _chunks(left, lambda d: d.group, options["vectorize"])


def _chunks(items: list, group_of: Callable[[Any], str], size: int) -> list[list]:
    """Items of one group, `size` at a time, groups in order of first appearance: the unsharded run's chunks."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)
    return [members[i : i + size] for members in groups.values() for i in range(0, len(members), size)]


def _shard_paths(paths: list[Path], shard: shards.Shard, attack: attacks.Attack, options: dict[str, Any]) -> list[Path]:
    """The dumps of one shard: whole vectorised chunks of the unsharded plan, from the dumps' headers alone."""
    size = options["vectorize"] if getattr(attack, "vectorised", False) else 1
    groups = {path: _group_of(fileformat.read_meta(path, fileformat.kind_of(path, DUMP_KINDS))) for path in paths}
    units = _chunks(paths, groups.__getitem__, size)
    return [path for unit in shard.take(units) for path in unit]


def _attack_chunk(
    attack: attacks.Attack, chunk: list[Dump], options: dict[str, Any], progress, stop: GracefulStop
) -> tuple[list[AttackResult], MatchState | None]:
    """Run the attack on one chunk; returns the results and, after an early stop, the state to resume from."""
    targets = [target_from_dump(read_dump(d.path, options.get("model")), d.path, options.get("model"), _MODELS)
               for d in chunk]
    if not getattr(attack, "vectorised", False):
        return [attack.run(targets[0], seed=options["seed"], progress=progress)], None
    out = Path(options["out"])
    checkpoint = _checkpoint_path(out, chunk)
    resume = None
    if options["resume"] and checkpoint.exists():
        stored = fileformat.read(checkpoint, "attack-state")  # its settings, seed and dumps were checked up front
        resume = MatchState(step=int(stored.meta["step"]), tensors=stored.tensors)

    def save(state: MatchState) -> None:
        _write_checkpoint(checkpoint, chunk, attack, options, state)

    results = attack.run_many(targets, seed=options["seed"], progress=progress, resume=resume, checkpoint=save,
                              checkpoint_every=options["checkpoint_every"], should_stop=stop)
    return results, attack.last_outcome.state


def _checkpoint_path(out: Path, chunk: list[Dump]) -> Path:
    return OutputDir(out).subdir(CHECKPOINT_DIR, create=False) / chunk[0].path.name  # refused if a symlink


def _write_checkpoint(path: Path, chunk: list[Dump], attack: attacks.Attack, options: dict[str, Any],
                      state: MatchState) -> None:
    fileformat.write(path, "attack-state", state.tensors, {
        "attack": {"name": attack.name, "params": attack.params()},
        "sources": [{"file": d.path.name, "sha256": d.sha256} for d in chunk],
        "step": state.step, "seed": options["seed"], "tool": tool_info(), "created": now_iso(),
    })


def _check_resumable(out: Path, dumps: list[Dump], attack: attacks.Attack, seed: int,
                     trusted_builder: str | None = None) -> None:
    """--resume continues only the same attack, settings and seed on the same dumps; refuse anything else up front."""
    settings = {"name": attack.name, "params": attack.params()}
    shas = {d.path.name: d.sha256 for d in dumps}
    for checkpoint in OutputDir(out).files(CHECKPOINT_DIR, "*.safetensors"):  # symlinks refused, never read
        meta = fileformat.read(checkpoint, "attack-state").meta
        if meta["attack"] != settings or meta["seed"] != seed:
            raise UserError(f"{checkpoint} was written by another attack, settings or seed; resume with the same "
                            "command, or start over with --force.")
        changed = [s["file"] for s in meta["sources"] if shas.get(s["file"], s["sha256"]) != s["sha256"]]
        if changed:
            raise UserError(f"{checkpoint} continues dumps that have changed since ({', '.join(changed[:3])}"
                            f"{' ...' if len(changed) > 3 else ''}); start over with --force.")
        by_name = {d.path.name: d for d in dumps}
        group = [by_name.get(s["file"]) for s in meta["sources"]]
        if hasattr(attack, "check_resume") and all(group):  # every tensor must fit the run it continues
            stored = fileformat.read(checkpoint, "attack-state")
            targets = [target_from_dump(read_dump(d.path, trusted_builder), d.path, trusted_builder) for d in group]
            try:
                attack.check_resume(targets, MatchState(step=int(meta["step"]), tensors=stored.tensors), seed)
            except UserError as err:
                raise UserError(f"{checkpoint}: {err}") from err
    for dump in dumps:
        if dump.out.is_symlink():  # a reconstruction precode wrote is a plain file, never a link
            raise UserError(f"{dump.out} is a symbolic link that precode did not create; remove it or start over "
                            "with --force.")
        if dump.out.exists():
            meta = fileformat.read(dump.out, "reconstruction").meta
            done = meta["attack"]
            if {"name": done.get("name"), "params": done.get("params")} != settings or done.get("seed") != seed:
                raise UserError(f"{dump.out} was made by another attack, settings or seed; resume with the same "
                                "command, or start over with --force.")


def _finished(dump: Dump) -> bool:
    """Whether a complete reconstruction of exactly this dump is already on disk."""
    if not dump.out.exists():
        return False
    meta = fileformat.read(dump.out, "reconstruction").meta
    return meta["source"].get("sha256") == dump.sha256 and meta["attack"].get("completed", True)


def _write_reconstruction(dump: Dump, result: AttackResult, attack: attacks.Attack, options: dict[str, Any],
                          seconds: float, complete: bool) -> None:
    stored_meta = fileformat.read_meta(dump.path, dump.kind)
    meta = {key: stored_meta[key] for key in ("model", "defense", "data")}
    images = data.denormalize(result.inputs, meta["data"]).clamp(0, 1)
    attack_meta = {
        "name": attack.name, "params": attack.params(), "seed": options["seed"], "label_source": result.label_source,
        "seconds": round(seconds, 3), "completed": complete, "iterations_done": int(len(result.loss_trace)),
        "threads": torch.get_num_threads(),  # float sums depend on it on the CPU
        "threat_model": threat_model(attack, stored_meta),
    }
    for extra in ("note", "stopped_at"):
        if getattr(result, extra, None) is not None:
            attack_meta[extra] = getattr(result, extra)
    fileformat.write(dump.out, "reconstruction", {
        "images": images, "labels": result.labels, "loss_trace": result.loss_trace.to(torch.float32),
    }, {
        "attack": attack_meta, "source": {"file": dump.path.name, "sha256": dump.sha256,
                                          **({"content_sha256": dump.content_sha256} if dump.content_sha256 else {})},
        **meta, "tool": tool_info(), "created": now_iso(),
    })


def threat_model(attack: attacks.Attack, dump_meta: dict[str, Any]) -> str:
    """Who the attacker was: a malicious server when the attack needs it or the server changed the model it sent."""
    malicious = attack.threat_model == "malicious-server" or dump_meta["capture"].get("threat", "honest") != "honest"
    return "malicious-server" if malicious else "honest-but-curious"


def _print_summary(rows: list[tuple[str, float, str, float]]) -> None:
    from precode_cli.cli_support import plain_row  # dump names are the files' names: plain text, not markup

    table = Table(title="attack")
    for column in ("dump", "final matching loss", "labels", "seconds"):
        table.add_column(column, justify="right" if column != "dump" else "left",
                         overflow="fold" if column == "dump" else "ellipsis")  # a long file name wraps, never cut
    for name, loss, source, seconds in rows:
        plain_row(table, name, f"{loss:.4f}", source, f"{seconds:.1f}")
    stdout.print(table)
