"""A federated client's local training (FedAvg), written once for the client and for the attacker.

A FedAvg client receives the global weights, runs `steps` steps of SGD on its own examples and
sends back the weights it ends with. The recipe says how: learning rate, momentum, weight decay,
local batch size. Step s trains on the s-th batch of the examples in their order, cycling: with
n examples and batch size B the batches are [0, B), [B, 2B), ... (the last may be smaller), as a
DataLoader without shuffling and without drop_last gives them, epoch after epoch.

`sgd_step` is plain functional SGD on dicts of tensors. The client's simulation (capture) calls it
on the gradients its defense stack computes, the attacker's unrolled replay (attacks/unrolled.py)
calls it on gradients it differentiates through; one implementation, so both sides agree exactly.
It equals `torch.optim.SGD(lr, momentum, weight_decay)` without dampening or Nesterov, up to the
rounding of fused kernels.

What the server knows of the recipe and what an attacker must assume is part of the recipe
(`known`): in Flower, the server sends the learning rate and step count in its config, and the
client reports its number of examples; the rest is assumed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from precode_cli.errors import UserError
from precode_cli.limits import MAX_BATCH, MAX_LOCAL_STEPS
RECIPE_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "steps", "epochs", "batch_size", "num_examples",
                 "shuffle", "labels_per_step")


@dataclass(frozen=True)
class LocalRecipe:
    """How one client trained locally before it sent its weights back."""

    lr: float
    steps: int = 1
    batch_size: int = 1
    num_examples: int = 1
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int | None = None  # set when the client trained in whole epochs; `steps` stays authoritative
    shuffle: bool = False  # True: the client shuffled its examples, so an attacker can only assume the order
    labels_per_step: bool = True  # the attacker knows which labels each step used (shared labels, no shuffle)
    optimizer: str = "sgd"
    known: tuple[str, ...] = field(default_factory=tuple)  # fields the server knows; the rest are assumed

    def __post_init__(self) -> None:
        check_recipe(self)

    @property
    def batches(self) -> list[tuple[int, int]]:
        """The local batches, as [start, stop) positions among the client's examples."""
        return [(a, min(a + self.batch_size, self.num_examples)) for a in range(0, self.num_examples, self.batch_size)]

    def step_batch(self, step: int) -> tuple[int, int]:
        """The [start, stop) positions step `step` (0-based) trains on."""
        batches = self.batches
        return batches[step % len(batches)]

    @property
    def single_sgd_step(self) -> bool:
        """One step on all examples: the update is the gradient times -lr (plus weight decay), exactly FedSGD."""
        return self.steps == 1

    def to_meta(self) -> dict[str, Any]:
        meta = asdict(self)
        meta["known"] = list(self.known)
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "LocalRecipe":
        values = {k: meta[k] for k in RECIPE_FIELDS if k in meta}
        return cls(**values, known=tuple(meta.get("known", ())))


def check_recipe(recipe: LocalRecipe) -> None:
    """One sentence for the first thing wrong with a recipe, naming the capture option that sets it."""
    def finite(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if recipe.optimizer != "sgd":
        raise UserError(f"local training uses SGD; optimizer {recipe.optimizer!r} is not supported.")
    if not finite(recipe.lr) or not 1e-12 <= recipe.lr <= 1e6:  # the attack divides the update by it
        raise UserError(f"--local-lr must be a positive number from 1e-12 to 1e6, not {recipe.lr!r}.")
    if not finite(recipe.momentum) or not 0 <= recipe.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), not {recipe.momentum!r}.")
    if not finite(recipe.weight_decay) or recipe.weight_decay < 0:
        raise UserError(f"--weight-decay must be non-negative, not {recipe.weight_decay!r}.")
    for name, value, high in (("--local-steps", recipe.steps, MAX_LOCAL_STEPS),
                              ("--local-batch-size", recipe.batch_size, MAX_BATCH),
                              ("the number of examples", recipe.num_examples, MAX_BATCH)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise UserError(f"{name} must be an integer in 1..{high}, not {value!r}.")
    if recipe.batch_size > recipe.num_examples:
        raise UserError(f"--local-batch-size {recipe.batch_size} is larger than the client's {recipe.num_examples} "
                        "example(s) (--batch-size); use at most that many.")
    if recipe.steps < len(recipe.batches):
        raise UserError(f"{recipe.steps} local step(s) of batch size {recipe.batch_size} do not reach all "
                        f"{recipe.num_examples} examples; use at least {len(recipe.batches)} steps, or count only the "
                        "examples the client trained on.")
    if recipe.epochs is not None and (isinstance(recipe.epochs, bool) or not isinstance(recipe.epochs, int)
                                      or recipe.steps != steps_for_epochs(recipe.epochs, recipe.num_examples,
                                                                          recipe.batch_size)):
        raise UserError(f"{recipe.epochs!r} local epoch(s) do not make {recipe.steps} steps of batch size "
                        f"{recipe.batch_size} over {recipe.num_examples} examples.")
    unknown = [name for name in recipe.known if name not in RECIPE_FIELDS]
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a field of the local recipe ({', '.join(RECIPE_FIELDS)}).")


def steps_for_epochs(epochs: int, num_examples: int, batch_size: int) -> int:
    """Local steps of `epochs` passes over `num_examples` examples in batches of `batch_size`."""
    return epochs * math.ceil(num_examples / batch_size)


def sgd_step(
    params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], momentum_buffers: dict[str, torch.Tensor],
    recipe: LocalRecipe, first: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One SGD step, functionally: new weights and new momentum buffers (PyTorch's convention: the first
    step's buffer is the gradient itself). Differentiable, so the attacker can unroll it."""
    new_params, new_buffers = {}, {}
    for name, weight in params.items():
        g = grads[name]
        if recipe.weight_decay:
            g = g + recipe.weight_decay * weight
        if recipe.momentum:
            g = g if first else recipe.momentum * momentum_buffers[name] + g
            new_buffers[name] = g
        new_params[name] = weight - recipe.lr * g
    return new_params, new_buffers


def pseudo_gradient(global_params: dict[str, torch.Tensor], returned: dict[str, torch.Tensor],
                    recipe: LocalRecipe) -> dict[str, torch.Tensor]:
    """The update as a gradient: (global - returned) / lr, minus weight decay's share on a single step.

    On a single full-batch step this is the client's gradient (to rounding), so every attack on
    gradients applies; on several steps it is the average step direction the unrolled attack matches.
    """
    grads = {}
    for name, weight in global_params.items():
        g = (weight - returned[name]) / recipe.lr
        if recipe.weight_decay and recipe.steps == 1:
            g = g - recipe.weight_decay * weight
        grads[name] = g
    return grads
