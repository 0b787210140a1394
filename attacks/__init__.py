"""Gradient-leakage attacks, by the name users pass to --method.

Adding an attack is one module with an `Attack` subclass and one entry in `REGISTRY`.
"""

from __future__ import annotations

from attacks.base import Attack, AttackResult, AttackTarget
from attacks.inverting_gradients import InvertingGradients
from precode_cli.errors import UserError

REGISTRY: dict[str, type[Attack]] = {"ig": InvertingGradients}

__all__ = ["REGISTRY", "Attack", "AttackResult", "AttackTarget", "create"]


def create(method: str, **options) -> Attack:
    """The attack for `--method NAME`, with its options."""
    if method not in REGISTRY:
        raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[method](**options)
