"""The interface every defense implements: a few client-side hooks, all optional.

A defense may change the model (PRECODE inserts a bottleneck), add a term to the training loss
(PRECODE's KL), watch the client's forward pass (Soteria), compute the gradient its own way
(DP-SGD's per-example clipping), or perturb the gradient the client shares (noise, pruning). The
same hooks run in training and in capture (`DefenseStack.client_gradients`), so a defense's cost
in accuracy and its protection are measured on the same client.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ClassVar, ContextManager

import torch
from torch import nn

from precode_cli.errors import UserError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def number_in(value: Any, option: str, low: float, high: float = math.inf, *,
              low_included: bool = False, high_included: bool = False) -> float:
    """A defense parameter as a float inside its interval, else one sentence naming the option.

    Parameters arrive from the command line, YAML files and dump metadata, so text, booleans, NaN
    and infinities are refused here, once, for every defense.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    above = number >= low if low_included else number > low
    below = number <= high if high_included else number < high
    if isinstance(value, bool) or not math.isfinite(number) or not (above and below):
        if math.isfinite(high):
            interval = f"in {'[' if low_included else '('}{low:g}, {high:g}{']' if high_included else ')'}"
        else:
            interval = f"{'at least' if low_included else 'above'} {low:g}"
        raise UserError(f"{option} must be a number {interval}, not {value!r}.")
    return number


class Defense:
    """Base class: a defense that does nothing. Subclasses override the hooks they need."""

    name: ClassVar[str] = "none"
    # Constructor parameter -> the command-line option (without "--", with "_") that sets it.
    cli_options: ClassVar[dict[str, str]] = {}

    def params(self) -> dict[str, Any]:
        """Parameters as recorded in files (JSON-able)."""
        return {}

    def apply_to_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        """Change the architecture before training or capture; default: unchanged."""
        return model

    def recording(self) -> ContextManager[Any]:
        """A context the client's forward pass and loss run in, for defenses that must watch them."""
        return contextlib.nullcontext()

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term for the client's loss, computed after the forward pass; default: none."""
        return None

    def compute_gradients(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn,
        names: list[str], generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None:
        """Compute (loss, logits, gradient by parameter name) in place of plain autograd; default: None (don't)."""
        return None

    def perturb_gradients(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Change the gradient the client shares; default: unchanged."""
        return grads

    def privacy(self, steps: int, sample_rate: float) -> dict[str, Any] | None:
        """A formal privacy guarantee after `steps` training steps at `sample_rate`; default: none."""
        return None
