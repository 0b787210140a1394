"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) and its improved variant iDLG (Zhao et al. 2020).

Both minimise the squared L2 distance between the dummy's gradient and the shared gradient, summed
over all parameters, with L-BFGS (lr 1, torch's history of 100, no line search) from a random start,
and without a box or prior, as the papers do. They differ in the labels: DLG optimises a dummy
label logit vector jointly with the input when the client kept its labels (the model is trained
on the soft label softmax(dummy)), iDLG reads the labels off the output-bias gradient first and
optimises the input only.

`iterations` counts L-BFGS outer steps (`optimizer.step` calls), as in the DLG code: each step runs
up to 20 L-BFGS iterations (at most 25 evaluations of the matching loss), so a run costs up to
25 x iterations forward-and-double-backward passes. The loss trace holds the loss at the start of
every step. L-BFGS without line search can diverge; when the loss becomes non-finite the run stops,
returns the last input whose loss was finite, fills the rest of the trace with that loss, and says
so in the result's `note`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attacks.base import Attack, AttackResult, AttackTarget, Progress
from attacks.inverting_gradients import resolve_labels
from precode_cli.errors import UserError

DEFAULT_ITERATIONS = 300
DEFAULT_LR = 1.0
MAX_ITER = 20  # L-BFGS iterations per outer step: torch's default, which DLG uses
HISTORY_SIZE = 100  # torch's default, which DLG uses


@dataclass
class DeepLeakageResult(AttackResult):
    """An `AttackResult` whose `stopped_at` is the outer step that hit a non-finite loss (None when every
    step finished), and whose `note` says so."""


class _NonFinite(Exception):
    """Raised inside the L-BFGS closure to abandon a step as soon as the loss is not finite."""


class DeepLeakage(Attack):
    """`--method dlg`: L-BFGS on input (and labels, when not shared) to match the shared gradient."""

    name = "dlg"

    def __init__(
        self,
        iterations: int | None = DEFAULT_ITERATIONS,
        lr: float | None = DEFAULT_LR,
        tv_weight: float | None = None,
        ignore_layers: list[str] | None = None,
    ) -> None:
        """None stands for the default; `tv_weight` is accepted for the CLI's sake and ignored (DLG has no prior).

        `ignore_layers` names modules (e.g. "classifier.bottleneck") whose parameters' gradients
        are left out of the distance.
        """
        self.iterations = DEFAULT_ITERATIONS if iterations is None else iterations
        self.lr = DEFAULT_LR if lr is None else lr
        if self.iterations < 1:
            raise UserError(f"--iterations must be at least 1, not {self.iterations}.")
        if not self.lr > 0:  # also refuses NaN
            raise UserError(f"--lr must be positive, not {self.lr}.")
        self.ignore_layers = list(ignore_layers or [])
        if not all(isinstance(layer, str) and layer for layer in self.ignore_layers):
            raise UserError(f"ignore_layers must be a list of module names, not {ignore_layers!r}.")

    def params(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations, "lr": self.lr, "optimizer": "lbfgs", "max_iter": MAX_ITER,
            "history_size": HISTORY_SIZE, "distance": "squared_l2", "init": "randn",
            "ignore_layers": list(self.ignore_layers),
        }

    def run(self, target: AttackTarget, seed: int, progress: Progress | None = None) -> AttackResult:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the model's own randomness (PRECODE's sampling) in the attacker's replay
        device = target.shared_grads[0].device  # drawn on the CPU, so every device starts from the same point
        x = torch.randn(target.batch_size, *target.input_shape, generator=generator).to(device)
        if target.labels is not None:
            return self._match(target, x, target.labels, "dump", None, progress)
        dummy_label = torch.randn(target.batch_size, target.num_classes, generator=generator).to(device)
        return self._match(target, x, None, "optimized", dummy_label, progress)

    def check(self, target: AttackTarget) -> None:
        super().check(target)  # a multi-step client update: refused, as by every attack on single gradients
        self._matched(target)

    def _matched(self, target: AttackTarget) -> list[int]:
        """Positions in `target.param_names` whose gradients enter the distance."""

        def ignored(name: str, layer: str) -> bool:
            return name == layer or name.startswith(layer + ".")

        for layer in self.ignore_layers:
            if not any(ignored(name, layer) for name in target.param_names):
                raise UserError(f"ignore_layers names {layer!r}, which has no parameter with a shared gradient.")
        keep = [i for i, name in enumerate(target.param_names)
                if not any(ignored(name, layer) for layer in self.ignore_layers)]
        if not keep:
            raise UserError(f"ignore_layers {self.ignore_layers} leaves no gradient to match.")
        return keep

    def _match(
        self,
        target: AttackTarget,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        source: str,
        dummy_label: torch.Tensor | None,
        progress: Progress | None,
    ) -> DeepLeakageResult:
        """Run L-BFGS on `x` (and `dummy_label` when given, else with the fixed `labels`)."""
        keep = self._matched(target)
        all_params = target.params()
        params = [all_params[i] for i in keep]
        shared = [target.shared_grads[i].detach() for i in keep]
        variables = [x.requires_grad_(True)] + ([dummy_label.requires_grad_(True)] if dummy_label is not None else [])
        optimizer = torch.optim.LBFGS(variables, lr=self.lr, max_iter=MAX_ITER, history_size=HISTORY_SIZE)
        last: dict[str, Any] = {"values": [v.detach().clone() for v in variables], "loss": None}

        def closure() -> torch.Tensor:
            logits = target.model(x)
            if dummy_label is None:
                loss = target.loss_fn(target.model, logits, labels)
            else:
                loss = soft_label_loss(target, logits, dummy_label)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            distance = torch.stack([(g - s).pow(2).sum() for g, s in zip(grads, shared)]).sum()
            if not torch.isfinite(distance):
                raise _NonFinite
            last["values"], last["loss"] = [v.detach().clone() for v in variables], float(distance.detach())
            for variable, grad in zip(variables, torch.autograd.grad(distance, variables)):
                variable.grad = grad
            return distance.detach()

        trace = torch.empty(self.iterations, dtype=torch.float32)
        stopped_at = None
        for step in range(self.iterations):
            try:
                trace[step] = optimizer.step(closure)
            except _NonFinite:
                stopped_at = step
                break
            if progress is not None:
                progress(step + 1)
        values = [v.detach() for v in variables]
        note = None
        if stopped_at is not None:
            trace[stopped_at:] = float("nan") if last["loss"] is None else last["loss"]
            values = last["values"]
            note = (f"the matching loss became non-finite in L-BFGS step {stopped_at + 1} of {self.iterations}; "
                    f"the run stopped there and returns the last input with a finite loss.")
        elif not all(torch.isfinite(v).all() for v in values):
            values = last["values"]
            note = "the last L-BFGS step left non-finite values; the result is the last input with a finite loss."
        if dummy_label is not None:
            labels = values[1].argmax(dim=1).to(torch.int64)
        return DeepLeakageResult(inputs=values[0], labels=labels, label_source=source, loss_trace=trace,
                                 stopped_at=stopped_at, note=note)


class ImprovedDeepLeakage(DeepLeakage):
    """`--method idlg`: labels read off the output-bias gradient (or the dump's), then L-BFGS on the input only."""

    name = "idlg"

    def run(self, target: AttackTarget, seed: int, progress: Progress | None = None) -> AttackResult:
        labels, source = resolve_labels(target)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the model's own randomness (PRECODE's sampling) in the attacker's replay
        x = torch.randn(target.batch_size, *target.input_shape, generator=generator)
        return self._match(target, x.to(target.shared_grads[0].device), labels, source, None, progress)


def soft_label_loss(target: AttackTarget, logits: torch.Tensor, dummy_label: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against softmax(dummy_label), plus the client's defense term.

    The client's loss takes hard labels, so its extra term (PRECODE's beta * KL) is isolated as
    loss_fn(hard) - cross_entropy(hard) at the dummy's current argmax; it stays differentiable.
    """
    soft = torch.sum(-F.softmax(dummy_label, dim=-1) * F.log_softmax(logits, dim=-1), dim=-1).mean()
    hard = dummy_label.detach().argmax(dim=-1)
    defense_term = target.loss_fn(target.model, logits, hard) - F.cross_entropy(logits, hard)
    return soft + defense_term
