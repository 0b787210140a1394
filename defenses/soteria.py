"""`soteria`: prune the shared gradient of the layer after the representation, where it leaks the input most.

Source: Sun, Li, Wang, Zhou, Li, Chen, "Soteria: Provable Defense against Privacy Leakage in
Federated Learning from Representation Perspective" (CVPR 2021). Gradient inversion mostly
recovers the input from the representation r (the input of the fully connected layer after the
feature extractor), because that layer's weight gradient is dL/dy r^T. Soteria perturbs r so
that a reconstruction from it lands far from x while r changes little; the paper approximates
the reconstruction change caused by perturbing feature i by ||r_i|| / ||dr_i/dx|| and prunes the
features for which it is largest, i.e. zeroes the matching columns of that layer's weight
gradient. Every other gradient is shared unchanged.

Simplification, following the authors' reference code: for every feature i, over the batch b,

    score_i = sum_b ||d r_{b,i} / d x_b||_2 / |r_{b,i}|      (inf where r_{b,i} = 0)

(the reference backpropagates a one-hot over feature i for the whole batch, so with BatchNorm in
train mode the per-sample gradients include the batch coupling; so does this), and the
round(percent / 100 * F) features (at least 1) of smallest score, i.e. of largest ||r||/||dr/dx||,
lose their weight-gradient column. `percent` defaults to 1, the reference code's default
(`percent_num=1`); the paper studies much larger pruning rates, so tune it. The score needs F
backward passes (F = the layer's in_features) per shared gradient, run batched a chunk at a time.

Two rules name the pruned features, because the authors' two scripts differ (docs/defenses.md):
- `count` (the default): the round(percent / 100 * F) features of smallest score above, among
  the live ones: a feature with r = 0 for the whole batch (a dead ReLU) scores inf and is pruned
  only when percent exceeds the live fraction. Its weight-gradient column is zero anyway.
- `gs`: the authors' GS (Inverting Gradients) script, `reconstruct_image.py`: score_i = sum_b
  ||dr_{b,i}/dx_b|| / (r_{b,i} + 0.1), the threshold is numpy's percentile `percent` of the
  scores (linear interpolation), and a feature is pruned when |score_i| < threshold. Dead
  features score 0 and are counted in the percentile, so on a ReLU model the features really
  pruned are fewer than `percent` says, none at all once the dead fraction reaches `percent`.
  (Their DLG notebook divides by r alone, percentile 1, on a sigmoid LeNet without dead features.)

The layer: `layer`, a named nn.Linear, or by default the last nn.Linear one dry forward pass
calls (the output layer; with PRECODE, `<at>.layer`, whose input is the VB's output). Its input
must be [batch, in_features].

How a caller runs it (the `Defense` hooks alone do not see the client's input):
`apply_to_model` registers two forward pre-hooks, idle unless the defense is *recording*: one on
the model, which makes the model's input a leaf that requires grad (a detached copy, only if it
does not already require grad) and keeps it, and one on the layer, which keeps its input r.
`loss_term` (run by `DefenseStack.loss` right after the forward pass, while the graph is alive)
computes the mask from them and adds nothing to the loss; `perturb_gradients` applies the mask
and consumes it. So the client's forward pass and loss must run inside `soteria.recording()`:

    with soteria.recording():                       # or one context per stack, see the report
        loss = stack.loss(model, model(inputs), labels)
    grads = torch.autograd.grad(loss, params)
    shared = stack.perturb_gradients(dict(zip(names, grads)), generator)

Outside `recording()` (training, attacks re-running the model) the hooks do nothing and cost
nothing; `perturb_gradients` without a mask from the preceding recorded pass raises
RuntimeError, so an unwired caller fails loudly instead of sharing an unprotected gradient.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from defenses.base import Defense, number_in
from defenses.precode import last_linear_name
from precode_cli.errors import UserError

DEFAULT_PERCENT = 1.0
SCORE_CHUNK_FLOATS = 16 * 2**20  # input gradients held at once while scoring: about 64 MB of float32


def pruned_count(features: int, percent: float) -> int:
    """How many of `features` representation features are pruned: round(percent/100 * F), at least 1."""
    return min(features, max(1, round(percent / 100 * features)))


RULES = ("count", "gs")
GS_OFFSET = 0.1  # the GS script divides by r + 0.1


def feature_scores(representation: torch.Tensor, inputs: torch.Tensor, rule: str = "count") -> torch.Tensor:
    """score_i = sum_b ||d r_{b,i}/d x_b|| / |r_{b,i}| (inf where r_{b,i} = 0); small = prune first.
    With rule `gs`, the GS script's sum_b ||d r_{b,i}/d x_b|| / (r_{b,i} + 0.1).

    `representation` [B, F] must have been computed from `inputs` [B, ...] with the graph alive.
    The F backward passes run batched (`is_grads_batched`), a chunk of features at a time.
    """
    batch, features = representation.shape
    norms = torch.empty(batch, features, dtype=torch.float64, device=representation.device)
    chunk = max(1, SCORE_CHUNK_FLOATS // max(inputs.numel(), 1))
    for first in range(0, features, chunk):
        count = min(chunk, features - first)
        one_hot = torch.zeros(count, batch, features, dtype=representation.dtype, device=representation.device)
        one_hot[torch.arange(count), :, torch.arange(first, first + count)] = 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ops without a batching rule fall back to a loop: slower, same result
            (dx,) = torch.autograd.grad(representation, inputs, one_hot, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        if dx is None:
            norms[:, first : first + count] = 0
        else:
            norms[:, first : first + count] = torch.linalg.vector_norm(dx.reshape(count, batch, -1).double(), dim=2).T
    if rule == "gs":
        return (norms / (representation.detach().double() + GS_OFFSET)).sum(dim=0)
    magnitude = representation.detach().double().abs()
    ratio = torch.where(magnitude > 0, norms / magnitude.clamp_min(1e-300), torch.full_like(norms, math.inf))
    return ratio.sum(dim=0)


def feature_mask(scores: torch.Tensor, percent: float, rule: str = "count") -> torch.Tensor:
    """1 for kept features, 0 for the pruned ones: the pruned_count(F, percent) of smallest score
    (`count`), or those with |score| below the scores' percentile `percent` (`gs`, numpy's linear rule)."""
    if rule == "gs":
        threshold = torch.quantile(scores.double(), percent / 100)  # numpy.percentile's default interpolation
        return (scores.abs() >= threshold).to(scores.dtype)
    mask = torch.ones_like(scores)
    mask[scores.topk(pruned_count(scores.numel(), percent), largest=False).indices] = 0
    return mask


class Soteria(Defense):
    """`--defense soteria`: zero `percent`% of the representation columns of `layer`'s weight gradient."""

    name = "soteria"
    cli_options = {"percent": "soteria_percent", "layer": "soteria_layer", "rule": "soteria_rule"}

    def __init__(self, percent: float = DEFAULT_PERCENT, layer: str | None = None, rule: str = "count") -> None:
        value = number_in(percent, "--soteria-percent", 0, 100, high_included=True)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise UserError(f"--soteria-layer must be the name of an nn.Linear submodule, not {layer!r}.")
        if rule not in RULES:
            raise UserError(f"--soteria-rule must be one of {', '.join(RULES)}, not {rule!r}.")
        self.percent, self.layer, self.rule = value, layer, rule
        self._module: nn.Linear | None = None
        self._recording = False
        self._inputs: torch.Tensor | None = None
        self._representation: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._weight_name: str | None = None
        self.last_pruned: list[int] = []  # feature (column) indices pruned by the latest recorded pass

    def params(self) -> dict[str, Any]:
        return {"percent": self.percent, "layer": self.layer, "rule": self.rule}

    def apply_to_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        name = self.layer or last_linear_name(model, input_shape)
        module = dict(model.named_modules()).get(name)
        if not isinstance(module, nn.Linear):
            raise UserError(f"--soteria-layer must name an nn.Linear submodule of the model; {name!r} is "
                            f"{'missing' if module is None else type(module).__name__}.")
        self._module, self.layer = module, name  # files record the layer actually pruned
        model.register_forward_pre_hook(self._keep_inputs, prepend=True)  # the raw input, before any other pre-hook (an imprint)
        module.register_forward_pre_hook(self._keep_representation)
        return model

    @contextlib.contextmanager
    def recording(self) -> Iterator["Soteria"]:
        """Run the client's forward pass and loss inside this so the next perturb_gradients has its mask."""
        self._recording, self._mask = True, None
        try:
            yield self
        finally:
            self._recording = False
            self._inputs = self._representation = None

    def _keep_inputs(self, _model: nn.Module, args: tuple) -> tuple | None:
        if not (self._recording and torch.is_grad_enabled()):
            return None
        inputs = args[0]
        if not inputs.requires_grad:
            inputs = inputs.detach().requires_grad_(True)
        self._inputs = inputs
        return (inputs, *args[1:])

    def _keep_representation(self, _module: nn.Module, args: tuple) -> None:
        if self._recording and torch.is_grad_enabled():
            self._representation = args[0]

    def loss_term(self, model: nn.Module) -> None:
        if not self._recording:
            return None
        if self._inputs is None or self._representation is None:
            raise RuntimeError("soteria: the recorded forward pass did not reach the model input and the chosen layer")
        rep = self._representation
        if rep.dim() != 2:
            raise UserError(f"soteria needs the layer's input as [batch, features], but it has shape {tuple(rep.shape)}.")
        self._mask = feature_mask(feature_scores(rep, self._inputs, self.rule), self.percent, self.rule)
        self.last_pruned = (self._mask == 0).nonzero().flatten().tolist()
        self._weight_name = next(f"{n}.weight" for n, m in model.named_modules() if m is self._module)
        self._inputs = self._representation = None
        return None

    def perturb_gradients(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self._mask is None or self._weight_name is None:
            raise RuntimeError("soteria: run the client's forward pass and loss inside Soteria.recording() "
                               "before perturb_gradients; it needs that pass's input and representation")
        mask, name = self._mask, self._weight_name
        self._mask = None
        shared = dict(grads)
        if name in shared:
            grad = shared[name]
            keep = mask.to(grad.device).bool().expand_as(grad)
            shared[name] = torch.where(keep, grad, torch.zeros_like(grad))
        return shared
