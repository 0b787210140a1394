"""`ig-bn`: Inverting Gradients with GradInversion's BatchNorm prior (Yin et al., CVPR 2021).

A client that trains with BatchNorm in train mode moves each layer's running statistics towards its
batch's mean and variance, and its update reveals them (precode_cli/bn_stats.py; `capture-gradients
--record-bn-stats` stores them in the dump). GradInversion adds to the gradient-matching loss, for
every BatchNorm layer l, ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2, where mu_l(x) and var_l(x)
are the mean and biased variance of the layer's input for the dummy batch x, and mu_l, var_l the
recorded ones. GradInversion matched the population statistics of a trained model's buffers; the
revealed batch statistics are a much tighter prior, zero exactly at the true batch.

Weight (`--bn-weight`, default 0.01, the low end of the 1e-2 .. 1e-1 used with GradInversion's prior;
the breaching library's `see-through-gradients` preset weighs it 0.1 against a gradient distance of
its own scale). Our matching loss is the cosine distance (at most 2). On an untrained resnet18 at the
random start, the prior's gradient with respect to the image is about 100 times the cosine distance's
(measured on built-in images, batch sizes 1 and 2), so 0.01 gives the two terms equal say in the
signed step at first, and the gradient keeps deciding once the statistics match; 0.1 lets the prior
lead. benchmarks/bn_prior.py measures both.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from attacks.base import AttackTarget, refuse_update
from attacks.inverting_gradients import InvertingGradients
from precode_cli import bn_stats
from precode_cli.errors import UserError

DEFAULT_BN_WEIGHT = 0.01


class BatchNormPrior:
    """GradInversion's BatchNorm term for every row (restart r of victim v is row r * V + v), against the
    statistics each victim's dump recorded."""

    def __init__(self, model: nn.Module, targets: list[AttackTarget], restarts: int, device: torch.device) -> None:
        recorded = [t.bn_stats for t in targets]
        if any(r is None for r in recorded):
            raise UserError(NO_STATS)
        self.layers = list(recorded[0])
        if any(list(r) != self.layers for r in recorded[1:]):
            raise UserError("dumps attacked together record the statistics of different BatchNorm layers; "
                            "attack them with --vectorize 1.")
        modules = dict(model.named_modules())
        for layer in self.layers:
            if not isinstance(modules.get(layer), nn.modules.batchnorm._BatchNorm):
                raise UserError(f"the dump records BatchNorm statistics of {layer!r}, which is not a BatchNorm "
                                "layer of its model.")
        self.model = model

        def per_row(which: int) -> dict[str, torch.Tensor]:
            return {layer: torch.stack([r[layer][which] for r in recorded]).to(device).repeat(restarts, 1)
                    for layer in self.layers}

        self.means, self.variances = per_row(0), per_row(1)

    def watching(self, model: nn.Module | None = None) -> contextlib.AbstractContextManager[dict[str, list[torch.Tensor]]]:
        """The recorded layers' inputs of the forward passes inside the context, of `model` (a victim's own
        model, in the row loop) or of the first victim's."""
        return bn_stats.watching(model if model is not None else self.model, self.layers)

    def penalty(self, inputs: dict[str, list[torch.Tensor]], row: int) -> torch.Tensor:
        """sum over layers of ||mean - recorded mean||_2 + ||variance - recorded variance||_2 for `row`."""
        terms = []
        for layer in self.layers:
            if len(inputs[layer]) != 1:
                raise UserError(f"BatchNorm layer {layer!r} ran {len(inputs[layer])} times in one forward pass; "
                                "ig-bn needs every recorded layer to run once.")
            mean, variance = bn_stats.batch_stats(inputs[layer][0])
            terms.append(torch.linalg.vector_norm(mean - self.means[layer][row])
                         + torch.linalg.vector_norm(variance - self.variances[layer][row]))
        return torch.stack(terms).sum()  # the norm's gradient at exactly zero is 0 in PyTorch, not NaN


NO_STATS = ("ig-bn matches the BatchNorm statistics that the client's update revealed, but the dump records none; "
            "capture it with --record-bn-stats (a model with BatchNorm, --mode train), or use --method ig.")


class BatchNormInvertingGradients(InvertingGradients):
    """`--method ig-bn`: Inverting Gradients plus the BatchNorm prior on the statistics the dump recorded."""

    name = "ig-bn"

    def __init__(self, bn_weight: float | None = None, **options: Any) -> None:
        super().__init__(**options)
        weight = DEFAULT_BN_WEIGHT if bn_weight is None else bn_weight
        if not 0 < weight <= 1e6:  # also refuses NaN
            raise UserError(f"--bn-weight must be above 0 and at most 1e6, not {weight} (0 is --method ig).")
        self.config = replace(self.config, bn_weight=float(weight))

    def check(self, target: AttackTarget) -> None:
        if target.local is not None:
            refuse_update(self.name, target.local)
        if target.bn_stats is None:
            raise UserError(NO_STATS)
        super().check(target)

    def params(self) -> dict[str, Any]:
        params = super().params()
        params["bn_weight"] = self.config.bn_weight
        return params
