"""The one optimisation loop that every gradient-matching attack configures.

It optimises dummy inputs (and nothing else, yet) so that the gradient they produce under the
client's loss matches the shared gradient. Attacks differ in the distance, the regulariser, and
the optimiser settings, which are all fields of `MatchingConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import AttackTarget, Progress


@dataclass
class MatchingConfig:
    """Settings of one gradient-matching run."""

    iterations: int = 7000
    lr: float = 0.01
    tv_weight: float = 1e-6
    signed: bool = True  # step on the sign of the input gradient (Inverting Gradients)
    boxed: bool = True  # keep inputs inside the valid pixel range
    lr_decay_at: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)  # fractions of `iterations`; lr x0.1 at each
    progress_every: int = 25


def gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of a gradient taken as one vector over all parameters."""
    return torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()


def cosine_distance(grads: list[torch.Tensor], shared: list[torch.Tensor], shared_norm: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of two gradients, each taken as one vector over all parameters.

    `shared_norm` is `gradient_norm(shared)`, passed in because it is constant during an attack.
    """
    dot = torch.stack([(g * s).sum() for g, s in zip(grads, shared)]).sum()
    return 1 - dot / (gradient_norm(grads) * shared_norm).clamp_min(1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV)."""
    return (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean() + (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()


def match_gradients(
    target: AttackTarget,
    labels: torch.Tensor,
    config: MatchingConfig,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise dummy inputs from a random start; return them and the matching loss per iteration."""
    params = target.params()
    shared = [g.detach() for g in target.shared_grads]
    shared_norm = gradient_norm(shared)
    x = torch.randn(target.batch_size, *target.input_shape, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=config.lr)
    milestones = sorted({int(config.iterations * f) for f in config.lr_decay_at})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    trace = torch.empty(config.iterations)
    for step in range(config.iterations):
        optimizer.zero_grad(set_to_none=True)
        loss = target.loss_fn(target.model, target.model(x), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        objective = cosine_distance(list(grads), shared, shared_norm)
        trace[step] = objective.detach()
        if config.tv_weight > 0:
            objective = objective + config.tv_weight * total_variation(x)
        (input_grad,) = torch.autograd.grad(objective, x)
        x.grad = input_grad.sign() if config.signed else input_grad
        optimizer.step()
        scheduler.step()
        if config.boxed:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, target.upper), target.lower))
        if progress is not None and ((step + 1) % config.progress_every == 0 or step + 1 == config.iterations):
            progress(step + 1)
    return x.detach(), trace
