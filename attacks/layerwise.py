"""Gradient matching computed layer by layer from activations, for all victims in one batch.

For a Linear layer y = a W^T + b, the gradient of the weight is a sum of outer products,
dL/dW = sum_b d_b a_b^T (d = dL/dy), so the two numbers the cosine distance needs follow without
ever forming it:  <dL/dW, S> = sum_b d_b^T S a_b  and  ||dL/dW||^2 = sum_{b,b'} (d_b.d_b')(a_b.a_b').
For a Conv2d layer the per-sample gradient is d_b times the unfolded input (small for convolutions).
One forward and backward pass over all victims' inputs concatenated gives every d_b and a_b at
once, because each victim's loss depends only on its own images; so many victims cost little more
than one, and the paper's MLP never builds its 3M-entry weight gradient. It applies when every
layer with parameters is a Linear or a plain Conv2d and all victims share the weights (one capture
run); `attacks.optimization` falls back to a vmap of the generic objective otherwise.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attacks.low_rank import factorize_rows as low_rank_factors


def supports(model: nn.Module) -> bool:
    """Whether every module with parameters of its own is a Linear or a zero-padded, ungrouped Conv2d."""
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            return False  # statistics over the batch would mix the victims
        if next(module.parameters(recurse=False), None) is None:
            continue
        if isinstance(module, nn.Linear):
            continue
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
                and not isinstance(module.padding, str):
            continue
        return False
    return True


class LayerwiseObjective:
    """The vectorised matching objective of `rows` independent victims sharing one model."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        matched: list[str],
        shared: dict[str, torch.Tensor],  # parameter name -> [rows, *shape]
        shared_norm: torch.Tensor,  # [rows]
        labels: torch.Tensor,  # [rows, B]
        tv_weight: float,
        bottlenecks: dict[str, nn.Module],
        victims: int | None = None,  # rows repeat every `victims` rows (restarts); default: no repeats
        low_rank: bool = True,
    ) -> None:
        self.model, self.loss_fn, self.labels, self.tv_weight = model, loss_fn, labels, tv_weight
        self.shared, self.shared_norm, self.bottlenecks = shared, shared_norm, bottlenecks
        wanted = set(matched)
        self.layers = {}
        for name, module in model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            keys = {p: f"{name}.{p}" if name else p for p in own}
            chosen = {p: key for p, key in keys.items() if key in wanted}
            if chosen:
                self.layers[name] = (module, chosen)
        # Shared Linear weight gradients that are exactly low rank, as factors (see attacks.low_rank).
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if low_rank:
            rank, distinct = labels.shape[1], victims or labels.shape[0]
            for module, chosen in self.layers.values():
                if isinstance(module, nn.Linear) and "weight" in chosen:
                    factors = low_rank_factors(shared[chosen["weight"]], rank, distinct)
                    if factors is not None:
                        self.factors[chosen["weight"]] = factors

    def subset(self, rows: torch.Tensor) -> "LayerwiseObjective":
        """The same objective for some of the rows only (those still running after an early stop)."""
        part = copy.copy(self)
        part.labels, part.shared_norm = self.labels[rows], self.shared_norm[rows]
        part.shared = {name: value[rows] for name, value in self.shared.items() if name not in self.factors}
        part.factors = {name: (left[rows], right[rows]) for name, (left, right) in self.factors.items()}
        return part

    def __call__(self, inputs: torch.Tensor, noise: dict[str, torch.Tensor] | None,
                 leaves: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Gradients of the summed objective for `leaves`, and each row's cosine distance."""
        rows, batch = inputs.shape[:2]
        captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in self.layers}

        def record(name: str):
            def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                captured[name].append((args[0], output))
            return hook

        hooks = [module.register_forward_hook(record(name)) for name, (module, _) in self.layers.items()]
        for name, vb in self.bottlenecks.items():
            vb.noise = noise[name].reshape(rows * batch, -1) if noise else None
        try:
            x = inputs.reshape(rows * batch, *inputs.shape[2:])
            logits = self.model(x)
            # The client's loss is a mean over its batch; summed over victims it is rows x the mean over all.
            loss = self.loss_fn(self.model, logits, self.labels.reshape(-1)) * rows
        finally:
            for hook in hooks:
                hook.remove()
            for vb in self.bottlenecks.values():
                vb.noise = None
        outputs = [out for calls in captured.values() for _, out in calls]
        deltas = iter(torch.autograd.grad(loss, outputs, create_graph=True))
        dot = torch.zeros(rows, dtype=inputs.dtype, device=inputs.device)
        square = torch.zeros(rows, dtype=inputs.dtype, device=inputs.device)
        for name, (module, chosen) in self.layers.items():
            calls = [(a, next(deltas)) for a, _ in captured[name]]
            d, s = _layer_terms(module, chosen, calls, rows, self.shared, self.factors)
            dot, square = dot + d, square + s
        distance = 1 - dot / (square.clamp_min(1e-24).sqrt() * self.shared_norm).clamp_min(1e-12)
        total = distance.sum()
        if self.tv_weight > 0:
            total = total + self.tv_weight * _total_variation_per_row(inputs).sum()
        return list(torch.autograd.grad(total, leaves)), distance.detach()


def _layer_terms(module: nn.Module, chosen: dict[str, str], calls: list, rows: int,
                 shared: dict[str, torch.Tensor],
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row <g, S> and ||g||^2 of one layer's matched parameters, g summed over the layer's calls.

    Where S = U V^T is known exactly (`factors`), <g, S> = sum_n (U^T d_n).(V^T a_n) reads U and V only.
    """
    if isinstance(module, nn.Linear):
        a = torch.cat([inp.reshape(rows, -1, inp.shape[-1]) for inp, _ in calls], dim=1)  # [rows, n, in]
        d = torch.cat([delta.reshape(rows, -1, delta.shape[-1]) for _, delta in calls], dim=1)  # [rows, n, out]
        dot = torch.zeros(rows, dtype=a.dtype, device=a.device)
        square = torch.zeros(rows, dtype=a.dtype, device=a.device)
        if "weight" in chosen and chosen["weight"] in factors:
            left, right = factors[chosen["weight"]]  # [rows, out, r], [rows, in, r]
            dot = dot + (torch.bmm(d, left) * torch.bmm(a, right)).sum(dim=(1, 2))
        elif "weight" in chosen:
            s_weight = shared[chosen["weight"]]  # [rows, out, in]
            dot = dot + (torch.bmm(a, s_weight.transpose(1, 2)) * d).sum(dim=(1, 2))
        if "weight" in chosen:
            square = square + (torch.bmm(d, d.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))
        if "bias" in chosen:
            g_bias = d.sum(dim=1)
            dot = dot + (g_bias * shared[chosen["bias"]]).sum(dim=1)
            square = square + g_bias.pow(2).sum(dim=1)
        return dot, square
    # Conv2d: per-sample weight gradients from the unfolded input, summed per row.
    device = calls[0][0].device
    dot = torch.zeros(rows, device=device)
    square = torch.zeros(rows, device=device)
    g_weight, g_bias = 0, 0
    for inp, delta in calls:
        unfolded = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=module.padding,
                            stride=module.stride)  # [N, C*kh*kw, L]
        flat_delta = delta.flatten(2)  # [N, out, L]
        if "weight" in chosen:
            per_sample = torch.bmm(flat_delta, unfolded.transpose(1, 2))  # [N, out, C*kh*kw]
            g_weight = g_weight + per_sample.reshape(rows, -1, *per_sample.shape[1:]).sum(dim=1)
        if "bias" in chosen:
            g_bias = g_bias + flat_delta.sum(dim=2).reshape(rows, -1, flat_delta.shape[1]).sum(dim=1)
    if "weight" in chosen:
        s_weight = shared[chosen["weight"]].reshape(rows, module.out_channels, -1)
        dot = dot + (g_weight * s_weight).sum(dim=(1, 2))
        square = square + g_weight.pow(2).sum(dim=(1, 2))
    if "bias" in chosen:
        dot = dot + (g_bias * shared[chosen["bias"]]).sum(dim=1)
        square = square + g_bias.pow(2).sum(dim=1)
    return dot, square


def _total_variation_per_row(inputs: torch.Tensor) -> torch.Tensor:
    """Each row's anisotropic TV: mean absolute difference of neighbouring pixels, as for one victim."""
    dx = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().flatten(1).mean(dim=1)
    dy = (inputs[..., 1:, :] - inputs[..., :-1, :]).abs().flatten(1).mean(dim=1)
    return dx + dy
