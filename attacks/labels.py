"""Labels read off a shared gradient, for clients that do not share them.

With mean cross-entropy, the output layer's bias gradient is (softmax - one_hot) / B per example,
summed: the true class's entry is negative and every other entry positive for one image (iDLG,
Zhao et al. 2020). For a batch we take the B most negative entries, which is right when the
batch's labels are distinct. Reading the bias (not the weight's sign) stays valid with PRECODE,
whose decoder can feed negative features to the last layer.
"""

from __future__ import annotations

import torch


def output_bias_name(param_names: list[str], shapes: list[torch.Size], num_classes: int) -> str | None:
    """The last bias with one entry per class: the output layer's bias, if there is one."""
    for name, shape in reversed(list(zip(param_names, shapes))):
        if name.endswith("bias") and tuple(shape) == (num_classes,):
            return name
    return None


def labels_from_bias_gradient(bias_grad: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The `batch_size` classes whose output-bias gradient is most negative, smallest first."""
    return torch.argsort(bias_grad)[:batch_size].sort().values.to(torch.int64)
