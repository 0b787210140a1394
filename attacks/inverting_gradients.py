"""Inverting Gradients (Geiping et al., NeurIPS 2020), with the PRECODE paper's settings as defaults.

Cosine distance between the dummy's gradient and the shared gradient over all parameters, plus
total variation; Adam on the sign of the input gradient; pixels boxed to the valid range; lr x0.1
at 3/8, 5/8 and 7/8 of the iterations; random start; labels from the dump, else read off the
output-bias gradient.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from attacks.base import Attack, AttackResult, AttackTarget, Progress
from attacks.labels import labels_from_bias_gradient, output_bias_name
from attacks.optimization import MatchingConfig, match_gradients
from precode_cli.errors import UserError


class InvertingGradients(Attack):
    """`--method ig`."""

    name = "ig"

    def __init__(self, iterations: int = 7000, lr: float = 0.01, tv_weight: float = 1e-6) -> None:
        if iterations < 1:
            raise UserError(f"--iterations must be at least 1, not {iterations}.")
        if not lr > 0:  # also refuses NaN
            raise UserError(f"--lr must be positive, not {lr}.")
        if not tv_weight >= 0:
            raise UserError(f"--tv-weight must be non-negative, not {tv_weight}.")
        self.config = MatchingConfig(iterations=iterations, lr=lr, tv_weight=tv_weight)

    def params(self) -> dict[str, Any]:
        params = asdict(self.config)
        params.pop("progress_every")
        params["lr_decay_at"] = list(params["lr_decay_at"])
        params["distance"] = "cosine"
        params["init"] = "randn"
        return params

    def run(self, target: AttackTarget, seed: int, progress: Progress | None = None) -> AttackResult:
        labels, source = resolve_labels(target)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the model's own randomness (PRECODE's sampling) in the attacker's replay
        inputs, trace = match_gradients(target, labels, self.config, generator, progress)
        return AttackResult(inputs=inputs, labels=labels, label_source=source, loss_trace=trace)


def resolve_labels(target: AttackTarget) -> tuple[torch.Tensor, str]:
    """Labels shared in the dump, else the ones read off the output-bias gradient."""
    if target.labels is not None:
        return target.labels, "dump"
    shapes = [g.shape for g in target.shared_grads]
    name = output_bias_name(target.param_names, shapes, target.num_classes)
    if name is None:
        raise UserError("the dump carries no labels and the model has no output bias to read them from.")
    bias_grad = target.shared_grads[target.param_names.index(name)]
    return labels_from_bias_gradient(bias_grad, target.batch_size), "recovered"
