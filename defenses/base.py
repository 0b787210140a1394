"""The interface every defense implements: three hooks on the client side, all optional.

A defense may change the model (PRECODE inserts a bottleneck), add a term to the training loss
(PRECODE's KL), or perturb the gradient the client shares (noise, pruning; see issue 5). The same
hooks run in training and in capture, so a defense's cost in accuracy and its protection are
measured on the same client.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class Defense:
    """Base class: a defense that does nothing. Subclasses override the hooks they need."""

    name: ClassVar[str] = "none"

    def params(self) -> dict[str, Any]:
        """Parameters as recorded in files (JSON-able)."""
        return {}

    def apply_to_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        """Change the architecture before training or capture; default: unchanged."""
        return model

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term for the client's loss, computed after the forward pass; default: none."""
        return None

    def perturb_gradients(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Change the gradient the client shares; default: unchanged."""
        return grads
