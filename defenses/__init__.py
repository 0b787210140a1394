"""Client-side defenses, by the name users pass to --defense, and the stack that applies them.

Adding a defense is one module with a `Defense` subclass and one entry in `REGISTRY`.
A defense list is stored in files as [{"name": ..., "params": {...}}, ...]; "none" is the empty list.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from defenses.cvb import CVB
from defenses.dp import DPSGD
from defenses.noise import NoiseDefense
from defenses.ppp import PartialPerturbation
from defenses.precode import Precode
from defenses.prune import GradientPruning
from defenses.soteria import Soteria
from precode_cli import models
from precode_cli.errors import UserError

REGISTRY: dict[str, type[Defense]] = {
    "none": Defense,
    "precode": Precode,
    "noise": NoiseDefense,
    "prune": GradientPruning,
    "dp": DPSGD,
    "soteria": Soteria,
    "ppp": PartialPerturbation,
    "cvb": CVB,
}
# Every defense parameter's command-line option (dest name) -> the defenses that read it.
DEFENSE_OPTIONS: dict[str, list[str]] = {}
for _name, _cls in REGISTRY.items():
    for _option in _cls.cli_options.values():
        DEFENSE_OPTIONS.setdefault(_option, []).append(_name)


@dataclass
class ClientStep:
    """One client step: the loss, the logits and the gradient the client shares, by parameter name."""

    loss: torch.Tensor
    logits: torch.Tensor
    grads: dict[str, torch.Tensor]


class DefenseStack:
    """The defenses a client runs, in order; the one place that knows how they combine."""

    def __init__(self, defenses: list[Defense]) -> None:
        computing = [d.name for d in defenses if type(d).compute_gradients is not Defense.compute_gradients]
        if len(computing) > 1:
            raise UserError(f"{' and '.join(computing)} each compute the gradient their own way; choose one of them.")
        watching = [d.name for d in defenses if type(d).recording is not Defense.recording]
        if computing and watching:
            raise UserError(f"{computing[0]} computes per-example gradients, which {watching[0]} cannot watch; "
                            "use them separately.")
        names = [d.name for d in defenses]
        if "ppp" in names and "cvb" in names and names.index("ppp") < names.index("cvb"):
            raise UserError("cvb renames the layer it goes in front of, and ppp names the layers it perturbs before "
                            "that; list cvb before ppp.")
        self.defenses = defenses

    @classmethod
    def from_specs(cls, specs: list[dict[str, Any]]) -> "DefenseStack":
        """Rebuild the stack recorded in a file."""
        built = []
        for spec in specs:
            name = spec.get("name")
            if name not in REGISTRY or name == "none":
                raise UserError(f"unknown defense {name!r} in the file; this precode knows: {', '.join(sorted(REGISTRY))}.")
            try:
                built.append(REGISTRY[name](**spec.get("params", {})))
            except TypeError as err:
                raise UserError(f"the file's {name} defense has parameters this precode does not know ({err}).") from err
        return cls(built)

    def specs(self) -> list[dict[str, Any]]:
        """The stack as recorded in files."""
        return [{"name": d.name, "params": d.params()} for d in self.defenses]

    def build_model(self, model_spec: dict[str, Any], trusted_builder: str | None = None) -> nn.Module:
        """Build the model a spec describes, with every defense applied (fresh weights).

        `trusted_builder` is the --model the user typed: only then is a user's own builder imported.
        """
        model = models.build(model_spec, trusted_builder=trusted_builder)
        for defense in self.defenses:
            model = defense.apply_to_model(model, tuple(model_spec["input_shape"]))
        return model

    def loss(self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The client's loss: mean cross-entropy plus every defense's loss term."""
        loss = F.cross_entropy(logits, labels)
        for defense in self.defenses:
            term = defense.loss_term(model)
            if term is not None:
                loss = loss + term
        return loss

    def client_gradients(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
    ) -> ClientStep:
        """What a client computes and shares for one batch: the same in training and in capture."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        for defense in self.defenses:
            computed = defense.compute_gradients(model, inputs, labels, self.loss, names, generator)
            if computed is not None:
                loss, logits, grads = computed
                break
        else:
            with contextlib.ExitStack() as watching:
                for defense in self.defenses:
                    watching.enter_context(defense.recording())
                logits = model(inputs)
                loss = self.loss(model, logits, labels)
            grads = dict(zip(names, torch.autograd.grad(loss, [p for _, p in named])))
        return ClientStep(loss.detach(), logits.detach(), self.perturb_gradients(grads, generator))

    def perturb_gradients(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """What the client finally shares."""
        for defense in self.defenses:
            grads = defense.perturb_gradients(grads, generator)
        return grads

    def privacy(self, steps: int, sample_rate: float) -> dict[str, Any] | None:
        """The formal guarantee of a training run, if a defense gives one (dp's epsilon)."""
        for defense in self.defenses:
            report = defense.privacy(steps, sample_rate)
            if report is not None:
                return {"defense": defense.name, **report}
        return None

    def loss_spec(self) -> dict[str, Any]:
        """How the shared gradient's loss was computed, as recorded in dumps."""
        return {
            "name": "cross_entropy",
            "reduction": "mean",
            "includes_vb_kl": any(isinstance(d, (Precode, CVB)) for d in self.defenses),
        }


def describe(specs: list[dict[str, Any]]) -> str:
    """A defense list as people write it: "none", "precode", "precode+noise"."""
    return "+".join(spec["name"] for spec in specs) or "none"


def defense_names(value: str | Iterable[str] | None) -> list[str]:
    """--defense values (repeatable, or comma-separated; "none" alone means no defense) as a list of names."""
    if value is None:
        return []
    raw = [value] if isinstance(value, str) else list(value)
    names = [part.strip() for item in raw for part in str(item).split(",") if part.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(f"unknown --defense {unknown[0]!r}; choose one of: {', '.join(sorted(REGISTRY))}.")
    if "none" in names and len(names) > 1:
        raise UserError("--defense none cannot be combined with other defenses; drop it.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--defense {repeated[0]} is given twice; give each defense once.")
    if "precode" in names and "ppp" in names:
        raise UserError("ppp already includes PRECODE's bottleneck; choose --defense ppp or --defense precode, not both.")
    return [n for n in names if n != "none"]


def stack_from_cli(defense: str | Iterable[str] | None, /, **options: Any) -> DefenseStack:
    """The stack for `--defense NAME ...` and the defense options among `options` (others are ignored).

    An option given (not None) for a defense that is not chosen is refused, so a typo in the defense
    list cannot silently drop a parameter.
    """
    names = defense_names(defense)
    for option, readers in DEFENSE_OPTIONS.items():
        if options.get(option) is not None and not set(readers) & set(names):
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} sets a parameter of --defense {' or '.join(readers)}, which is not chosen; "
                            f"add --defense {readers[0]} or drop {flag}.")
    built = []
    for name in names:
        cls = REGISTRY[name]
        kwargs = {param: options[option] for param, option in cls.cli_options.items() if options.get(option) is not None}
        built.append(cls(**kwargs))
    return DefenseStack(built)
