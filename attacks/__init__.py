"""Gradient-leakage attacks, by the name users pass to --method.

Adding an attack is one module with an `Attack` subclass and one entry in `REGISTRY`.
"""

from __future__ import annotations

from attacks.adaptive import AdaptiveInvertingGradients, NoiseInvertingGradients
from attacks.analytic import AnalyticFirstLayer
from attacks.base import Attack, AttackResult, AttackTarget
from attacks.bn_prior import BatchNormInvertingGradients
from attacks.dlg import DeepLeakage, ImprovedDeepLeakage
from attacks.imprint import ImprintAttack
from attacks.inverting_gradients import InvertingGradients
from precode_cli.errors import UserError

REGISTRY: dict[str, type[Attack]] = {
    "ig": InvertingGradients,
    "ig-adaptive": AdaptiveInvertingGradients,
    "ig-noise": NoiseInvertingGradients,
    "ig-bn": BatchNormInvertingGradients,
    "dlg": DeepLeakage,
    "idlg": ImprovedDeepLeakage,
    "analytic": AnalyticFirstLayer,
    "imprint": ImprintAttack,
}
# The options each method takes; giving another is refused rather than silently ignored.
IG_OPTIONS = ("iterations", "lr", "tv_weight", "preset", "restarts", "init", "ignore_layers", "patience",
              "min_improvement")
OPTIONS = {
    "ig": IG_OPTIONS,
    "ig-adaptive": IG_OPTIONS,
    "ig-noise": IG_OPTIONS,
    "ig-bn": (*IG_OPTIONS, "bn_weight"),
    "dlg": ("iterations", "lr", "ignore_layers"),
    "idlg": ("iterations", "lr", "ignore_layers"),
    "analytic": (),
    "imprint": (),
}

__all__ = ["REGISTRY", "Attack", "AttackResult", "AttackTarget", "create"]


def create(method: str, **options) -> Attack:
    """The attack for `--method NAME`; options left at None take the method's defaults."""
    if method not in REGISTRY:
        raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(REGISTRY)}.")
    given = {key: value for key, value in options.items() if value is not None and value != [] and value != ()}
    for key in given:
        if key not in OPTIONS[method]:
            takes = ", ".join(f"--{k.replace('_', '-')}" for k in OPTIONS[method]) or "no options"
            raise UserError(f"--{key.replace('_', '-')} does not apply to --method {method}, which takes {takes}.")
    return REGISTRY[method](**given)
