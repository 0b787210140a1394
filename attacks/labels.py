"""Labels read off a shared gradient, for clients that do not share them.

With mean cross-entropy, the output layer's bias gradient is g_c = (1/B) sum_i (p_ic - y_ic): the
batch's mean softmax minus the fraction of the batch labelled c. For one image the true class is
the only negative entry (iDLG, Zhao et al. 2020). For a batch, the count of class c is
n_c = B (p_c - g_c), where p_c, the mean softmax, is unknown; we estimate it as the model's mean
softmax on random inputs (exact enough for an untrained or barely trained model, whose outputs
hardly depend on the input) and round the counts to sum to B, every class with a negative entry
getting at least one. This handles repeated labels, which "the B most negative entries" cannot.
Reading the bias (not the weight's sign) stays valid with PRECODE, whose decoder can feed negative
features to the last layer.
"""

from __future__ import annotations

import torch
from torch import nn

from precode_cli.inspection import model_device
from precode_cli.models.imprint import ATTRIBUTE

IMPRINT_PREFIX = f"{ATTRIBUTE}."

PROBE_INPUTS = 16


def output_bias_name(param_names: list[str], shapes: list[torch.Size], num_classes: int) -> str | None:
    """The last bias with one entry per class: the output layer's bias, if there is one (never the bias of
    a malicious server's imprint module, which is registered last but runs first)."""
    for name, shape in reversed(list(zip(param_names, shapes))):
        if name.endswith("bias") and tuple(shape) == (num_classes,) and not name.startswith(IMPRINT_PREFIX):
            return name
    return None


@torch.no_grad()
def mean_softmax_on_noise(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The model's mean softmax over random normal inputs: the batch-independent part of p_c."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        was_training = model.training
        model.eval()
        probs = model(torch.randn(PROBE_INPUTS, *input_shape).to(model_device(model))).softmax(dim=1).mean(dim=0).cpu()
        model.train(was_training)
    return probs


def labels_from_bias_gradient(bias_grad: torch.Tensor, batch_size: int,
                              mean_softmax: torch.Tensor | None = None) -> torch.Tensor:
    """`batch_size` labels (sorted) whose counts best explain the output-bias gradient."""
    bias_grad = bias_grad.detach().double()
    if batch_size == 1:
        return bias_grad.argmin().view(1).to(torch.int64)
    classes = len(bias_grad)
    p = mean_softmax.double() if mean_softmax is not None else torch.full((classes,), 1.0 / classes,
                                                                         dtype=torch.float64)
    estimate = (batch_size * (p - bias_grad)).clamp_min(0)
    counts = estimate.floor()
    counts[(bias_grad < 0) & (counts < 1)] = 1  # a negative entry means the class is in the batch
    remainder = estimate - counts
    while counts.sum() < batch_size:
        best = int(remainder.argmax())
        counts[best] += 1
        remainder[best] -= 1
    while counts.sum() > batch_size:
        candidates = torch.where(counts > 1 if (counts > 1).any() else counts > 0, remainder, torch.inf)
        worst = int(candidates.argmin())
        counts[worst] -= 1
        remainder[worst] += 1
    return torch.repeat_interleave(torch.arange(classes), counts.to(torch.int64)).to(torch.int64)
