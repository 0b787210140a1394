"""`precode attack`: reconstruct the victims behind gradient dumps. Never opens a truth file.

The server's view is rebuilt from each dump alone: the architecture and defense from its metadata,
the weights and buffers from its `param.*` and `buffer.*` tensors, the shared gradient from
`grad.*`, and the labels when the client shared them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

import attacks
from attacks.base import AttackTarget
from defenses import DefenseStack
from precode_cli import atomic, data, fileformat
from precode_cli.cli_support import ProgressBar, stdout, now_iso, say, tune_allocator, tool_info
from precode_cli.errors import UserError

TRUTH_SUFFIX = ".truth.safetensors"


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


def target_from_dump(stored: fileformat.StoredFile, path: Path, trusted_builder: str | None = None) -> AttackTarget:
    """The server's view of one dump: model at capture, client loss, shared gradient, shared labels.

    `trusted_builder` is the user's --model: a dump naming a user's own builder is rebuilt only then.
    """
    meta = stored.meta
    stack = DefenseStack.from_specs(meta["defense"])
    model = stack.build_model(meta["model"], trusted_builder=trusted_builder)
    state = {**stored.prefixed("param"), **stored.prefixed("buffer")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path} does not match the model its metadata describes ({str(err).splitlines()[0]}).") from err
    model.train(meta["capture"].get("mode", "train") == "train")
    for p in model.parameters():
        p.requires_grad_(True)
    grads = stored.prefixed("grad")
    named = dict(model.named_parameters())
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
    )


def run_attack(options: dict[str, Any]) -> list[Path]:
    """Attack every dump as `options` say; returns the reconstruction paths written."""
    out = Path(options["out"])
    attack = attacks.create(options["method"], iterations=options["iterations"], lr=options["lr"],
                            tv_weight=options["tv_weight"])
    paths = dump_paths(options["dumps"])
    for path in paths:
        if path.name.endswith(TRUTH_SUFFIX):
            raise UserError(f"{path} is a truth file; the attack reads only gradient dumps.")
    for path in paths:  # validate every dump before any work, so a bad one leaves nothing half-done
        target_from_dump(fileformat.read(path, "gradients"), path, options.get("model"))
    targets_out = [out / path.name for path in paths]
    if len(set(targets_out)) != len(targets_out):
        raise UserError("two dumps have the same file name; attack them into separate --out directories.")
    if {p.resolve() for p in targets_out} & {p.resolve() for p in paths}:
        raise UserError(f"--out {out} is where the dumps are; reconstructions would replace them, so choose another --out.")
    atomic.refuse_overwrite(targets_out, options["force"])
    tune_allocator()
    tool = tool_info()
    rows = []
    say(f"Attacking {len(paths)} dump(s) with {options['method']} for {options['iterations']} iterations each.")
    with ProgressBar() as bar:
        overall = bar.task("dumps", total=len(paths))
        current = bar.task(paths[0].name, total=options["iterations"])
        for path in paths:
            stored = fileformat.read(path, "gradients")
            target = target_from_dump(stored, path, options.get("model"))
            current.restart(path.name)
            started = time.perf_counter()
            result = attack.run(target, seed=options["seed"], progress=current.set)
            seconds = time.perf_counter() - started
            images = data.denormalize(result.inputs, stored.meta["data"]).clamp(0, 1)
            fileformat.write(out / path.name, "reconstruction", {
                "images": images, "labels": result.labels, "loss_trace": result.loss_trace,
            }, {
                "attack": {"name": attack.name, "params": attack.params(), "seed": options["seed"],
                           "label_source": result.label_source, "seconds": round(seconds, 3)},
                "source": {"file": path.name, "sha256": fileformat.sha256_of(path)},
                "model": stored.meta["model"], "defense": stored.meta["defense"], "data": stored.meta["data"],
                "tool": tool, "created": now_iso(),
            })
            rows.append((path.name, float(result.loss_trace[-1]), result.label_source, seconds))
            overall.advance()
    _print_summary(rows)
    say(f"Wrote {len(rows)} reconstruction(s) to {out}.")
    return targets_out


def _print_summary(rows: list[tuple[str, float, str, float]]) -> None:
    table = Table(title="attack")
    for column in ("dump", "final matching loss", "labels", "seconds"):
        table.add_column(column, justify="right" if column != "dump" else "left")
    for name, loss, source, seconds in rows:
        table.add_row(name, f"{loss:.4f}", source, f"{seconds:.1f}")
    stdout.print(table)
