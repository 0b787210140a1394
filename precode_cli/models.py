"""Model builders: one function per architecture, looked up by the name users pass to --model.

A model is fully described by a JSON-able spec, so any stage can rebuild it from a file:
    {"name": "mlp", "kwargs": {"width": 1024}, "input_shape": [3, 32, 32], "num_classes": 10}
Defenses that change the architecture (PRECODE) are applied afterwards by `defenses`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from precode_cli.errors import UserError


class MLP(nn.Module):
    """The PRECODE paper's MLP: Linear(in, w)-ReLU-Linear(w, w)-ReLU-Linear(w, classes)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 1024) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 1024) -> nn.Module:
    """The paper's three-layer MLP (width 1024 by default)."""
    return MLP(input_shape, num_classes, width=width)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp}


def make_spec(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> dict[str, Any]:
    """A model spec as stored in every file's `model` metadata."""
    if name not in BUILDERS:
        raise UserError(f"unknown --model {name!r}; choose one of: {', '.join(sorted(BUILDERS))}.")
    return {"name": name, "kwargs": dict(kwargs), "input_shape": list(input_shape), "num_classes": int(num_classes)}


def build(spec: dict[str, Any]) -> nn.Module:
    """Build the undefended model a spec describes, with freshly initialised weights."""
    name = spec.get("name")
    if name not in BUILDERS:
        raise UserError(f"unknown model {name!r} in the file's model spec; this precode knows: {', '.join(sorted(BUILDERS))}.")
    try:
        return BUILDERS[name](tuple(spec["input_shape"]), int(spec["num_classes"]), **spec.get("kwargs", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"the model spec {spec} cannot be built ({err}).") from err
