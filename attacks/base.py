"""What an attack receives and returns, shared by every attack.

Following breaching's split, the `AttackTarget` is exactly the server's view: the model as it was
at capture (architecture, weights, mode), the client's loss function, and the shared gradient.
Attacks never see truth files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from precode_cli.errors import UserError
from precode_cli.local_training import LocalRecipe

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int], None]


@dataclass
class AttackTarget:
    """The model at capture, the client's loss, and the gradient the client shared for one batch."""

    model: nn.Module
    loss_fn: LossFn  # (model, logits, labels) -> scalar loss, as the client computed it
    param_names: list[str]  # trainable parameters, in the order of `shared_grads`
    shared_grads: list[torch.Tensor]
    labels: torch.Tensor | None  # shared labels, or None when the client kept them
    batch_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    lower: torch.Tensor  # [1, C, 1, 1]: smallest valid input per channel (pixel 0, normalised)
    upper: torch.Tensor  # [1, C, 1, 1]: largest valid input per channel (pixel 1, normalised)
    # A FedAvg update of several local steps: `shared_grads` is then its pseudo-gradient (global - returned) / lr,
    # and the attack must replay the steps. None for a gradient (a single-step update is read as one).
    local: LocalRecipe | None = None
    # The batch mean and biased variance of each BatchNorm layer's input in the client's forward pass, which its
    # update of the running statistics revealed (`capture-gradients --record-bn-stats`); None when not recorded.
    bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def params(self) -> list[torch.Tensor]:
        named = dict(self.model.named_parameters())
        return [named[name] for name in self.param_names]


@dataclass
class AttackResult:
    """A reconstruction in the model's input space (normalised), with the labels the attack used."""

    inputs: torch.Tensor  # [B, C, H, W], normalised like the model's inputs
    labels: torch.Tensor  # int64 [B]
    label_source: str  # "dump" (shared by the client) or "recovered" (read off the gradient)
    loss_trace: torch.Tensor  # float32 [iterations]: the matching loss at every iteration
    stopped_at: int | None = None  # the iteration where the attack stopped early, None when it ran them all
    note: str | None = None  # why it stopped early, in a sentence for the report


class Attack(ABC):
    """Base class of the attacks in the registry."""

    name: ClassVar[str]
    # Who the attacker is: the honest-but-curious server that only reads what the client shares, or a
    # malicious server that also changed the model it sent (recorded in every reconstruction).
    threat_model: ClassVar[str] = "honest-but-curious"

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Settings as recorded in the reconstruction file."""

    def check(self, target: AttackTarget) -> None:
        """Refuse, before any work, what this attack cannot do with `target` (a `UserError`); default: a
        multi-step update, which only an attack that replays the local steps can match."""
        if target.local is not None:
            refuse_update(self.name, target.local)

    @abstractmethod
    def run(self, target: AttackTarget, seed: int, progress: Progress | None = None) -> AttackResult:
        """Reconstruct the batch behind `target`'s shared gradient."""


def refuse_update(method: str, recipe: LocalRecipe) -> None:
    """One sentence for an attack on single gradients given an update of several local steps."""
    raise UserError(f"--method {method} matches a single gradient, but this client update has {recipe.steps} local "
                    "steps; use --method ig, ig-adaptive or ig-noise, which replay the steps.")
