"""What a Soteria percentage prunes under the two rules (`count`, ours; `gs`, the authors' GS script).

On ReLU models many of the representation's features are dead for a small batch (r = 0): their
weight-gradient column is already zero. `count` prunes percent% of the features, live ones first;
`gs` sets a percentile threshold over all scores, dead ones (score 0) included, so it prunes no
live feature until percent exceeds the dead fraction. For each model, percent and rule this prints
the dead fraction, the fraction of features pruned and the fraction pruned that were live, over
built-in victims at batch size 1 (untrained models, seed 0), and writes JSON.

    python benchmarks/soteria_rules.py --models mlp,cnn --percents 1,10,40,80 --victims 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from defenses import stack_from_cli
from precode_cli import __version__, data, models


def measure(model_name: str, percent: float, rule: str, victims: int) -> dict[str, float]:
    """Mean over victims of the dead, pruned and pruned-live fractions of the pruned layer's features."""
    spec, images = data.data_spec("builtin"), data.load("builtin", "train")
    stack = stack_from_cli("soteria", soteria_percent=percent, soteria_rule=rule)
    torch.manual_seed(0)
    model = stack.build_model(models.make_spec(model_name, tuple(spec["input_shape"]), spec["num_classes"])).train()
    soteria = stack.defenses[0]
    kept: dict[str, torch.Tensor] = {}
    hook = soteria._module.register_forward_pre_hook(lambda _m, args: kept.update(r=args[0].detach()))
    totals = {"dead": 0.0, "pruned": 0.0, "pruned_live": 0.0}
    try:
        for i in range(victims):
            x, y = data.normalize(images.images[i : i + 1], spec), images.labels[i : i + 1]
            with soteria.recording():
                loss = stack.loss(model, model(x), y)
            grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
            stack.perturb_gradients(grads, torch.Generator())
            dead = (kept["r"] == 0).all(dim=0)
            pruned = torch.zeros_like(dead)
            pruned[soteria.last_pruned] = True
            totals["dead"] += dead.float().mean().item()
            totals["pruned"] += pruned.float().mean().item()
            totals["pruned_live"] += (pruned & ~dead).float().mean().item()
    finally:
        hook.remove()
    return {key: value / victims for key, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--percents", default="1,10,40,80")
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/soteria_rules.json"))
    args = parser.parse_args()
    rows = []
    for model_name in args.models.split(","):
        for percent in [float(p) for p in args.percents.split(",")]:
            for rule in ("count", "gs"):
                rows.append({"model": model_name, "percent": percent, "rule": rule,
                             **measure(model_name, percent, rule, args.victims)})
    table = Table(title=f"soteria: what a percentage prunes (batch 1, {args.victims} built-in victims, untrained)")
    for column in ("model", "percent", "rule", "dead features", "pruned", "pruned and live"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['percent']:g}", r["rule"], f"{100 * r['dead']:.1f}%", f"{100 * r['pruned']:.1f}%",
                      f"{100 * r['pruned_live']:.1f}%")
    Console(width=120).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "soteria_rules", "precode": __version__, "torch": str(torch.__version__),
                                     "settings": {k: str(v) for k, v in vars(args).items()}, "results": rows},
                                    indent=2) + "\n")
    print(f"Wrote {args.json}.")


if __name__ == "__main__":
    main()
