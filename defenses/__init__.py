"""Client-side defenses, by the name users pass to --defense, and the stack that applies them.

Adding a defense is one module with a `Defense` subclass and one entry in `REGISTRY`.
A defense list is stored in files as [{"name": ..., "params": {...}}, ...]; "none" is the empty list.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from defenses.precode import Precode
from precode_cli import models
from precode_cli.errors import UserError

REGISTRY: dict[str, type[Defense]] = {"none": Defense, "precode": Precode}


class DefenseStack:
    """The defenses a client runs, in order; the one place that knows how they combine."""

    def __init__(self, defenses: list[Defense]) -> None:
        self.defenses = defenses

    @classmethod
    def from_specs(cls, specs: list[dict[str, Any]]) -> "DefenseStack":
        """Rebuild the stack recorded in a file."""
        built = []
        for spec in specs:
            name = spec.get("name")
            if name not in REGISTRY:
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

    def perturb_gradients(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """What the client finally shares."""
        for defense in self.defenses:
            grads = defense.perturb_gradients(grads, generator)
        return grads

    def loss_spec(self) -> dict[str, Any]:
        """How the shared gradient's loss was computed, as recorded in dumps."""
        return {
            "name": "cross_entropy",
            "reduction": "mean",
            "includes_vb_kl": any(isinstance(d, Precode) for d in self.defenses),
        }


def describe(specs: list[dict[str, Any]]) -> str:
    """A defense list as people write it: "none", "precode", "precode+noise"."""
    return "+".join(spec["name"] for spec in specs) or "none"


def stack_from_cli(name: str, precode_k: int, precode_beta: float, precode_at: str | None = None) -> DefenseStack:
    """The stack for `--defense NAME` and its options."""
    if name not in REGISTRY:
        raise UserError(f"unknown --defense {name!r}; choose one of: {', '.join(sorted(REGISTRY))}.")
    if name == "none":
        return DefenseStack([])
    if name == "precode":
        return DefenseStack([Precode(k=precode_k, beta=precode_beta, at=precode_at)])
    return DefenseStack([REGISTRY[name]()])
