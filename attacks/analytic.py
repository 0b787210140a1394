"""Analytic recovery of one input from the first fully connected layer (Phong et al. 2017; Geiping et al. 2020).

For a first layer y = W x + b that sees the flattened input x directly, the chain rule gives

    dL/dW[i] = dL/dy_i * x        and        dL/db[i] = dL/dy_i

for every output unit i, so any row with a non-zero bias gradient yields x = dL/dW[i] / dL/db[i]
exactly: no optimisation, no randomness, no prior. We divide at the row with the largest
|dL/db[i]| to keep rounding error smallest. With a batch the rows are sums over images and the
division returns a mixture, so one image per dump is required.

A FedAvg update of several local steps on that one image, without weight decay, is read the same
way: every step's first-layer gradient is (its dL/dy) x^T for the same x, so their sum, with
any learning rate and momentum, is still a multiple of x in every row.

Nothing later in the network enters the formula except through the scalar dL/dy_i, so PRECODE's
bottleneck before the output layer does not protect the input: its fresh noise changes dL/dy_i but
not the ratio. (A bottleneck placed in front of the first layer is itself a Linear on the input,
and the attack reads the input off its encoder.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attacks.base import Attack, AttackResult, AttackTarget, Progress
from attacks.inverting_gradients import resolve_labels
from precode_cli.errors import UserError
from precode_cli.inspection import model_device


class AnalyticFirstLayer(Attack):
    """`--method analytic`: the input read off the first layer's weight and bias gradients.

    The loss trace has one entry: the relative residual ||dW - db x^T|| / ||dW|| of the rank-one
    fit, about 1e-7 when the shared gradient came from one image and the recovery is exact.
    """

    name = "analytic"

    def __init__(self, iterations: int | None = None, lr: float | None = None, tv_weight: float | None = None) -> None:
        """Takes the CLI's common options for uniformity; the analytic attack uses none of them."""

    def params(self) -> dict[str, Any]:
        return {}

    def check(self, target: AttackTarget) -> None:
        if target.local is not None and target.local.weight_decay:
            raise UserError(f"--method analytic reads a client update of {target.local.steps} local steps only "
                            "without weight decay (which adds the weights themselves to the update); use --method ig.")
        self._first_layer(target)

    def run(self, target: AttackTarget, seed: int, progress: Progress | None = None) -> AttackResult:
        weight_name, bias_name, layer = self._first_layer(target)
        weight_grad = target.shared_grads[target.param_names.index(weight_name)].detach().double()
        bias_grad = target.shared_grads[target.param_names.index(bias_name)].detach().double()
        row = int(bias_grad.abs().argmax())
        if bias_grad[row] == 0:
            raise UserError(f"the bias gradient of the first layer ({layer}) is zero everywhere, "
                            f"so the analytic attack has nothing to divide by.")
        x = weight_grad[row] / bias_grad[row]
        residual = (weight_grad - torch.outer(bias_grad, x)).norm() / weight_grad.norm()
        labels, source = resolve_labels(target)
        if progress is not None:
            progress(1)
        return AttackResult(
            inputs=x.float().view(1, *target.input_shape), labels=labels, label_source=source,
            loss_trace=residual.float().view(1),
        )

    def _first_layer(self, target: AttackTarget) -> tuple[str, str, str]:
        """The first layer's weight and bias names, after checking the attack applies."""
        if target.batch_size != 1:
            raise UserError(f"the analytic attack recovers one image per dump, but this dump holds a batch of "
                            f"{target.batch_size}; capture with --batch-size 1.")
        layer = first_layer_name(target.model, target.input_shape)
        module = dict(target.model.named_modules())[layer]
        weight_name, bias_name = f"{layer}.weight", f"{layer}.bias"
        problem = _unusable(module, math.prod(target.input_shape))
        if problem:
            raise UserError(f"the analytic attack needs a fully connected first layer with bias on the flattened "
                            f"input; {type(target.model).__name__} has none (its first layer, {layer}, {problem}).")
        if weight_name not in target.param_names or bias_name not in target.param_names:
            raise UserError(f"the analytic attack needs the gradient of the first layer ({layer}), "
                            f"which this dump does not share.")
        return weight_name, bias_name, layer


def first_layer_name(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Name of the first module with parameters or buffers of its own that a forward pass calls.

    Found in execution order, not declaration order, by a dry pass that is cut off just before
    that module runs: nothing stateful executes (batch-norm statistics and PRECODE's last KL stay
    as they are), and the global random state is restored afterwards.
    """
    found: list[str] = []

    class Found(Exception):
        pass

    def stop(name: str):
        def hook(_module: nn.Module, _args: tuple) -> None:
            found.append(name)
            raise Found
        return hook

    hooks = [
        module.register_forward_pre_hook(stop(name))
        for name, module in model.named_modules()
        if next(module.parameters(recurse=False), None) is not None
        or next(module.buffers(recurse=False), None) is not None
    ]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros(1, *input_shape, device=model_device(model)))
    except Found:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise UserError(f"the analytic attack needs a fully connected first layer with bias; "
                        f"{type(model).__name__} has no layer with parameters or buffers.")
    return found[0]


def _unusable(module: nn.Module, in_features: int) -> str:
    """Why `module` cannot be inverted analytically, or "" when it can."""
    if not isinstance(module, nn.Linear):
        return f"is a {type(module).__name__}"
    if module.bias is None:
        return "is a Linear without bias"
    if module.in_features != in_features:
        return f"is a Linear on {module.in_features} features, not on the {in_features} input values"
    return ""
