"""What a model does on one dry forward pass: which submodules it calls, in which order.

Declaration order (`named_modules`) can differ from execution order; the defense's default
position and the adaptive attacks both need the latter. The pass runs on a zero input in eval
mode without gradients, and leaves the global random state as it was.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (dry passes must run there)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def called_modules(model: nn.Module, input_shape: tuple[int, ...],
                   select: Callable[[nn.Module], bool]) -> list[str]:
    """Names of the selected submodules in the order one forward pass calls them (repeats included)."""
    order: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
        for name, module in model.named_modules()
        if select(module)
    ]
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            model(torch.zeros(1, *input_shape, device=model_device(model)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return order
