"""`prune`: gradient pruning (compression), keeping only the largest entries of each gradient tensor.

Source: Zhu, Liu and Han, "Deep Leakage from Gradients" (NeurIPS 2019), section 5: gradients
with small magnitudes are set to zero, as gradient compression / sparsification for
communication does; DLG's reconstructions degrade once more than about 20% of the entries are
pruned. Also the "gradient pruning" baseline of later defense papers (e.g. Soteria).

Choice: the fraction is applied per tensor, not over the whole gradient at once, so every
layer keeps `keep` of its entries whatever the scale of its gradient (a global threshold would
wipe out whole layers whose gradients are small). Each tensor keeps exactly ceil(keep * numel)
(at least 1) entries, the largest by absolute value (ties broken by `torch.topk`); all others become 0.
keep = 1 shares the gradient unchanged. Deterministic: the generator is not used.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from defenses.base import Defense, number_in

DEFAULT_KEEP = 0.7


def kept_count(numel: int, keep: float) -> int:
    """How many entries of a tensor of `numel` entries survive: ceil(keep * numel)."""
    return min(numel, max(1, math.ceil(keep * numel - 1e-9)))


def prune_tensor(grad: torch.Tensor, keep: float) -> torch.Tensor:
    """`grad` with all but its ceil(keep * numel) largest-magnitude entries zeroed."""
    count = kept_count(grad.numel(), keep)
    if count >= grad.numel():
        return grad.clone()
    flat = grad.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(count, sorted=False).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(grad)


class GradientPruning(Defense):
    """`--defense prune`: keep the `keep` fraction (0 < keep <= 1) of largest entries per tensor."""

    name = "prune"
    cli_options = {"keep": "prune_keep"}

    def __init__(self, keep: float = DEFAULT_KEEP) -> None:
        self.keep = number_in(keep, "--prune-keep", 0, 1, high_included=True)

    def params(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def perturb_gradients(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {name: prune_tensor(grad, self.keep) for name, grad in grads.items()}
