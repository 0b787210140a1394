"""Adaptive attacks on PRECODE: what a server that knows the defense does.

PRECODE draws a fresh noise sample in every forward pass, so the attacker's replay cannot match
the gradients that depend on the client's draw. But those are only the bottleneck's decoder and
the layers after it; the layers before the bottleneck (and its encoder) receive gradients whose
direction is still set by the input. `ig-adaptive` matches those alone. `ig-noise` keeps every
gradient and makes the noise sample a variable, optimised jointly with the input.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from attacks.base import AttackTarget
from attacks.inverting_gradients import InvertingGradients
from attacks.optimization import MatchingConfig, bottlenecks
from precode_cli.errors import UserError
from precode_cli.inspection import called_modules


def layers_from_decoder_on(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, ...]:
    """PRECODE's decoders and every module with parameters that runs after the first decoder.

    Found in execution order by one dry forward pass (global random state restored afterwards).
    """
    vbs = bottlenecks(model)
    if not vbs:
        raise UserError("ig-adaptive leaves PRECODE's layers out, but this model has no PRECODE bottleneck; "
                        "use --method ig.")
    decoders = {f"{name}.decoder" for name in vbs}
    order = called_modules(model, input_shape, lambda module: next(module.parameters(recurse=False), None) is not None)
    first = min(order.index(d) for d in decoders if d in order)
    ignored: list[str] = []
    for name in order[first:]:
        if name not in ignored:
            ignored.append(name)
    return tuple(ignored)


class AdaptiveInvertingGradients(InvertingGradients):
    """`--method ig-adaptive`: Inverting Gradients on the gradients PRECODE's noise does not touch."""

    name = "ig-adaptive"

    def config_for(self, target: AttackTarget) -> MatchingConfig:
        automatic = layers_from_decoder_on(target.model, target.input_shape)
        return replace(self.config, ignore=tuple(dict.fromkeys(self.config.ignore + automatic)))

    def params(self) -> dict[str, Any]:
        params = super().params()
        params["ignores_from_decoder_on"] = True
        return params


class NoiseInvertingGradients(InvertingGradients):
    """`--method ig-noise`: Inverting Gradients with PRECODE's noise sample optimised jointly."""

    name = "ig-noise"

    def config_for(self, target: AttackTarget) -> MatchingConfig:
        if not bottlenecks(target.model):
            raise UserError("ig-noise optimises PRECODE's noise sample, but this model has no PRECODE bottleneck; "
                            "use --method ig.")
        return replace(self.config, optimize_noise=True)

    def params(self) -> dict[str, Any]:
        params = super().params()
        params["optimize_noise"] = True
        return params
