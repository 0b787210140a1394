"""Linear weight gradients stored by their structure, losslessly (format version 2).

A Linear layer applied once to a batch of B rows has the weight gradient
`grad_output.T @ input`: a sum of B outer products. At batch size 1 that is two vectors instead of
a matrix (1024 + 3072 floats instead of 3 million for the paper's MLP). Capture records each
Linear layer's input and output gradient while the client computes its gradient, rebuilds the
matrix with `rebuild` and keeps the factors only when the result is bit-identical (`torch.equal`)
to the gradient the client shares; anything else (a gradient-space defense, a layer used twice, a
batch where the factors are no smaller) is stored whole. The reader calls the same `rebuild`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

LEFT, RIGHT = "left", "right"  # factor.<param>.left: [B, out] (output gradients); .right: [B, in] (inputs)
PREFIX = "factor."


def rebuild(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The weight gradient from its factors: sum over rows b of left[b] (outer) right[b]."""
    return left.t().mm(right)


def names(param: str) -> tuple[str, str]:
    """The two tensor names that hold a factored gradient of `param`."""
    return f"{PREFIX}{param}.{LEFT}", f"{PREFIX}{param}.{RIGHT}"


class LinearRecorder:
    """Records every Linear layer's 2-D input and output gradient during one client step."""

    def __init__(self) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.grads: dict[str, list[torch.Tensor]] = {}

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator["LinearRecorder"]:
        handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                handles.append(module.register_forward_hook(self._hook(name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        keep = self._keep

        def forward(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if _transformed(output) or (args and _transformed(args[0])):
                # inside vmap or grad (per-example gradients, as `dp` computes them): no plain tensors to
                # keep; two entries mark the layer as used more than once, so its gradient is stored whole
                self.inputs.setdefault(name, []).extend([torch.empty(0), torch.empty(0)])
                return
            self.inputs.setdefault(name, []).append(args[0].detach() if args else torch.empty(0))
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(keep(name))
        return forward

    def _keep(self, name: str):
        def backward(grad: torch.Tensor) -> None:
            if _transformed(grad):
                # a batched backward through the layer (Soteria's scores, `is_grads_batched`): not the client's
                # gradient; two entries mark the layer as used more than once, so its gradient is stored whole
                self.grads.setdefault(name, []).extend([torch.empty(0), torch.empty(0)])
                return
            self.grads.setdefault(name, []).append(grad.detach())
        return backward

    def factor(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`grads` with every exactly-rebuildable, smaller Linear weight gradient replaced by its factors."""
        stored = dict(grads)
        for module, inputs in self.inputs.items():
            param = f"{module}.weight" if module else "weight"
            shared, outputs = grads.get(param), self.grads.get(module, [])
            if shared is None or len(inputs) != 1 or len(outputs) != 1:
                continue  # not shared, or used more than once: the gradient is a sum over uses
            right, left = inputs[0], outputs[0]
            if right.dim() != 2 or left.dim() != 2 or left.shape[0] != right.shape[0]:
                continue
            if left.dtype != shared.dtype or right.dtype != shared.dtype:
                continue
            if left.shape[0] * (left.shape[1] + right.shape[1]) >= shared.numel():
                continue  # no smaller than the matrix
            left, right = left.contiguous(), right.contiguous()
            if torch.equal(rebuild(left, right), shared):
                del stored[param]
                left_name, right_name = names(param)
                stored[left_name], stored[right_name] = left, right
        return stored


def _transformed(value: object) -> bool:
    """Whether `value` is a tensor wrapped by a torch.func transform (vmap, grad) or batched by autograd's
    own `is_grads_batched` (the legacy vmap)."""
    if not isinstance(value, torch.Tensor):
        return False
    try:
        functorch = torch._C._functorch
        legacy = getattr(functorch, "is_legacy_batchedtensor", lambda _value: False)
        return bool(functorch.is_functorch_wrapped_tensor(value) or legacy(value))
    except AttributeError:  # a torch without the check: be safe and treat it as transformed
        return True


def rebuild_all(tensors: dict[str, torch.Tensor], grad_prefix: str = "grad.") -> dict[str, torch.Tensor]:
    """`tensors` with every factored gradient rebuilt into `grad.<param>` and its factors dropped."""
    out = {name: t for name, t in tensors.items() if not name.startswith(PREFIX)}
    for name in tensors:
        if name.startswith(PREFIX) and name.endswith("." + LEFT):
            param = name[len(PREFIX):-len(LEFT) - 1]
            left_name, right_name = names(param)
            out[grad_prefix + param] = rebuild(tensors[left_name], tensors[right_name])
    return out
