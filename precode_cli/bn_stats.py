"""BatchNorm statistics as a leak: the mean and variance of each BatchNorm layer's input in a client's step.

In train mode a BatchNorm layer normalises with its input's batch mean and biased variance, and moves
its running statistics towards them: new = (1 - m) old + m stat, with the variance's unbiased form
(n / (n - 1) times the biased one, n the values per channel). A federated client that sends its
updated buffers back therefore reveals the batch statistics to a server that knows `old`, m and n
(`from_update`). `capture-gradients --record-bn-stats` stores them in the dump as
`bn_stats.<layer>.mean` and `bn_stats.<layer>.var` (the biased variance the forward pass normalised
with), and `--method ig-bn` (GradInversion's BatchNorm prior) matches a dummy batch's statistics to them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

PREFIX = "bn_stats."
REVEALED_BY = "client BatchNorm update"  # the `bn_stats.revealed_by` a dump records
VARIANCE = "biased"  # which variance is stored: the one the forward pass normalised with


def layers(model: nn.Module) -> list[str]:
    """The BatchNorm layers whose running statistics a train-mode step updates, in module order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None]


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dimension 1) mean and biased variance over the batch and every other dimension,
    as BatchNorm in train mode computes them."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def values_per_channel(x_shape: tuple[int, ...]) -> int:
    """n, the values BatchNorm averages per channel for an input of this shape."""
    n = x_shape[0]
    for side in x_shape[2:]:
        n *= side
    return n


def from_update(old_mean: torch.Tensor, old_var: torch.Tensor, new_mean: torch.Tensor, new_var: torch.Tensor,
                momentum: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the server reads off a client's BatchNorm buffers: the batch mean and biased variance."""
    mean = (new_mean - (1 - momentum) * old_mean) / momentum
    unbiased = (new_var - (1 - momentum) * old_var) / momentum
    return mean, unbiased * (n - 1) / n


def names(layer: str) -> tuple[str, str]:
    """The dump's tensor names of one layer's mean and variance."""
    return f"{PREFIX}{layer}.mean", f"{PREFIX}{layer}.var"


def split(stored: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{layer: (mean, var)}` from tensors named `<layer>.mean` / `<layer>.var` (the dump's, prefix removed)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in stored.items():
        layer, _, which = name.rpartition(".")
        found.setdefault(layer, {})[which] = tensor
    return {layer: (pair["mean"], pair["var"]) for layer, pair in found.items()}


@contextlib.contextmanager
def watching(model: nn.Module, layer_names: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """The inputs each named layer receives while the context is open, in call order (graph kept)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}
    hooks = []
    try:
        for name in layer_names:
            def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
                seen[name].append(args[0])

            hooks.append(modules[name].register_forward_pre_hook(hook))
        yield seen
    finally:
        for handle in hooks:
            handle.remove()
