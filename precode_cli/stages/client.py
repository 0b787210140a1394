"""What a federated client computes on its examples: one shared gradient (FedSGD), or local training (FedAvg).

Both run the defense stack exactly as `precode train` does at every step
(`DefenseStack.client_gradients`): PRECODE draws a fresh noise sample in every forward pass, and
gradient-space defenses (noise, prune, dp) perturb every local step's gradient. The SGD step is
`precode_cli.local_training.sgd_step`, the same function the attacker unrolls.
"""

from __future__ import annotations

import torch
from torch import nn

from defenses import DefenseStack
from precode_cli.errors import UserError
from precode_cli.local_training import LocalRecipe, sgd_step


def shared_gradient(model: nn.Module, stack: DefenseStack, inputs: torch.Tensor, labels: torch.Tensor,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The gradient one client step shares, by trainable parameter name."""
    try:
        return stack.client_gradients(model, inputs, labels, generator).grads
    except ValueError as err:
        if "Expected more than 1 value per channel" not in str(err):
            raise
        raise UserError("BatchNorm in train mode cannot normalise a single value per channel (one image with "
                        "tiny feature maps); use a larger --batch-size or --local-batch-size, --image-size, --mode "
                        "eval, or a model with --norm group.") from err


def local_training(model: nn.Module, stack: DefenseStack, inputs: torch.Tensor, labels: torch.Tensor,
                   recipe: LocalRecipe, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The weights a FedAvg client sends back after `recipe.steps` local steps, by trainable parameter name.

    The model's own weights and buffers are left as they were (the server's state), so the next
    client starts from the same global model.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_params = {n: p.detach().clone() for n, p in trainable.items()}
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    params, momentum = dict(global_params), {}
    try:
        for step in range(recipe.steps):
            start, stop = recipe.step_batch(step)
            with torch.no_grad():
                for name, weight in trainable.items():
                    weight.copy_(params[name])
            grads = shared_gradient(model, stack, inputs[start:stop], labels[start:stop], generator)
            params, momentum = sgd_step(params, {n: g.detach() for n, g in grads.items()}, momentum, recipe,
                                        first=step == 0)
    finally:
        with torch.no_grad():
            for name, weight in trainable.items():
                weight.copy_(global_params[name])
            for name, buffer in model.named_buffers():
                buffer.copy_(saved_buffers[name])
    return params
