"""PRECODE: a variational bottleneck (VB) inserted into any model (Scheliga et al., WACV 2022).

The VB encodes its input to the mean and (softplus) standard deviation of K Gaussian latents,
draws a fresh reparameterised sample on every forward pass, and decodes it back to the input's
shape. Because the sample changes on every pass, an attacker who re-runs the model cannot
reproduce the client's forward pass, which is what stops optimisation-based gradient inversion.
The training loss gains beta * KL(q(z|x) || N(0, I)).

Use it on your own model:

    from defenses.precode import insert_vb, vb_loss
    model = insert_vb(model, input_shape=(3, 32, 32))          # before the last nn.Linear
    loss = F.cross_entropy(model(x), y) + vb_loss(model)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from precode_cli.errors import UserError
from precode_cli.inspection import called_modules

DEFAULT_K = 256
DEFAULT_BETA = 1e-3


class VariationalBottleneck(nn.Module):
    """Encoder Linear(in, 2K) -> mean, softplus std -> sample -> decoder Linear(K, in), same shape out.

    Attacks recognise it without importing this package by `stochastic_bottleneck = True` and use
    `k`, `decoder` and `noise` (see attacks/optimization.py `bottlenecks`).
    """

    stochastic_bottleneck = True

    def __init__(self, feature_shape: tuple[int, ...], k: int = DEFAULT_K, beta: float = DEFAULT_BETA) -> None:
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        self.k = k
        self.beta = beta
        in_features = math.prod(self.feature_shape)
        self.encoder = nn.Linear(in_features, 2 * k)
        self.decoder = nn.Linear(k, in_features)
        self.last_kl: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None  # [B, K] standard-normal draw to use instead of a fresh one (ig-noise)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        stats = self.encoder(features.flatten(1))
        mean, std = stats[:, : self.k], F.softplus(stats[:, self.k :])
        noise = self.noise if self.noise is not None else torch.randn_like(std)
        sample = mean + std * noise
        self.last_kl = kl_to_standard_normal(mean, std)
        return self.decoder(sample).view(features.shape[0], *self.feature_shape)

    def extra_repr(self) -> str:
        return f"feature_shape={self.feature_shape}, k={self.k}, beta={self.beta}"


def kl_to_standard_normal(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, I)) in bits, summed over latents, averaged over the batch.

    Bits (division by ln 2) follow the PRECODE authors' implementation, so beta means the same here.
    """
    kl_nats = 0.5 * (mean.pow(2) + std.pow(2) - 2 * torch.log(std + 1e-12) - 1).sum(dim=1)
    return kl_nats.mean() / math.log(2)


def last_linear_name(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> str:
    """Name of the last nn.Linear: where PRECODE goes by default (before the output layer).

    With `input_shape`, "last" is in execution order, found by one dry forward pass, so a model
    that declares its output layer first still gets the bottleneck before it; without, in
    declaration order.
    """
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if not linears:
        raise UserError("the model has no nn.Linear layer; name the insertion point of PRECODE with --precode-at.")
    if input_shape is None:
        return list(linears)[-1]
    called = called_modules(model, input_shape, lambda module: isinstance(module, nn.Linear))
    if not called:
        raise UserError("the model calls no nn.Linear layer; name the insertion point of PRECODE with --precode-at.")
    return called[-1]


def insert_vb(
    model: nn.Module,
    input_shape: tuple[int, ...],
    at: str | None = None,
    k: int = DEFAULT_K,
    beta: float = DEFAULT_BETA,
) -> nn.Module:
    """Insert a VB in front of the submodule named `at` (default: the last nn.Linear) and return the model.

    The submodule is replaced by nn.Sequential(bottleneck=VB, layer=original), so the original
    layer's parameters are renamed `<at>.layer.*` and the VB's are `<at>.bottleneck.*`.
    The VB's input shape is found by one dry forward pass on a zero input of `input_shape`.
    """
    at = at or last_linear_name(model, input_shape)
    return insert_before(model, input_shape, at, lambda shape: VariationalBottleneck(shape, k=k, beta=beta))


def insert_before(
    model: nn.Module,
    input_shape: tuple[int, ...],
    at: str,
    build: Callable[[tuple[int, ...]], nn.Module],
    what: str = "PRECODE",
) -> nn.Module:
    """Wrap submodule `at` as nn.Sequential(bottleneck=build(its input shape), layer=original).

    Shared by every bottleneck defense (PRECODE, CVB), so they are placed, named and refused alike;
    `what` names the defense in the refusals.
    """
    modules = dict(model.named_modules())
    if at not in modules or at == "":
        raise UserError(f"the model has no submodule named {at!r} to insert {what} before; "
                        f"its submodules are: {_some_names(modules)}.")
    target = modules[at]
    shapes: list[tuple[int, ...]] = []

    def record_input_shape(_module: nn.Module, args: tuple) -> None:
        shapes.append(tuple(args[0].shape[1:]))

    hook = target.register_forward_pre_hook(record_input_shape)
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(torch.zeros(1, *input_shape))
            model.train(was_training)
    finally:
        hook.remove()
    if not shapes:
        raise UserError(f"submodule {at!r} is never called in the model's forward pass; {what} cannot go there.")
    if len(shapes) > 1:
        raise UserError(f"submodule {at!r} is called {len(shapes)} times in one forward pass (a shared layer); "
                        "name a position the data passes once, such as a whole block.")
    wrapped = nn.Sequential()
    wrapped.add_module("bottleneck", build(shapes[0]))
    wrapped.add_module("layer", target)
    parent_name, _, child_name = at.rpartition(".")
    parent = modules[parent_name] if parent_name else model
    setattr(parent, child_name, wrapped)
    return model


def _some_names(modules: dict[str, nn.Module], limit: int = 20) -> str:
    """The model's submodule names for an error message, shortened when there are many."""
    names = [name for name in modules if name]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def vb_loss(model: nn.Module) -> torch.Tensor:
    """beta * KL of every VB in the model, from its most recent forward pass."""
    terms = [m.beta * m.last_kl for m in model.modules() if isinstance(m, VariationalBottleneck) and m.last_kl is not None]
    if not terms:
        raise RuntimeError("vb_loss called before a forward pass through the PRECODE bottleneck")
    return torch.stack(terms).sum()


class Precode(Defense):
    """`--defense precode`: the VB before the output layer (or at `at`), beta * KL in the loss."""

    name = "precode"
    cli_options = {"k": "precode_k", "beta": "precode_beta", "at": "precode_at"}

    def __init__(self, k: int = DEFAULT_K, beta: float = DEFAULT_BETA, at: str | None = None) -> None:
        try:
            k, beta = int(k), float(beta)
        except (TypeError, ValueError):
            raise UserError(f"--precode-k must be a whole number and --precode-beta a number, not {k!r} and {beta!r}.") from None
        if k < 1:
            raise UserError(f"--precode-k must be at least 1, not {k}.")
        if not beta >= 0:
            raise UserError(f"--precode-beta must be non-negative, not {beta}.")
        self.k, self.beta, self.at = int(k), float(beta), at

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "beta": self.beta, "at": self.at}

    def apply_to_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        if self.at is None:
            self.at = last_linear_name(model, input_shape)
        return insert_vb(model, input_shape, at=self.at, k=self.k, beta=self.beta)

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        return vb_loss(model)
