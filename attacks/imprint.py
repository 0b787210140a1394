"""The imprint attack of a malicious server ("Robbing the Fed", Fowl et al., ICLR 2022).

The server sent a model with an imprint module in front (`capture-gradients --threat imprint`,
precode_cli/models/imprint.py): N bins that share one measurement direction w, bin k active for the
images whose measurement w.x exceeds its offset o_k. Image j's output gradient is one number c_j in
every bin it activates, so with dW_k and db_k the shared gradients of bin k's weight row and bias,

    dW_k - dW_{k+1} = sum of c_j x_j       db_k - db_{k+1} = sum of c_j

over the images whose measurement lies between o_k and o_{k+1} (the last bin alone for k = N-1).
A difference with a non-zero bias part is a hit, and a hit holding one image gives that image
exactly: x_j = (dW_k - dW_{k+1}) / (db_k - db_{k+1}). No optimisation, no prior. Two images in one
bin give their c-weighted mixture; an empty bin gives nothing (its differences are zero up to
rounding, below `RELATIVE_ZERO` of the largest bias gradient).

The attack returns one image per hit, at most the batch's B (with gradient noise every bin is a hit;
the B with the largest bias differences are kept, the ones that carry signal), and fills the rest of
the B with zeros in the normalised space: the data's mean colour, which evaluate's matching pairs with
the images it missed. PRECODE does not stop it: its noise changes each c_j but not the ratio.

Labels: the batch's labels (shared, else read off the output bias) are matched to the hits. For
each candidate class the model is run on the recovered image and the output gradient c_j that
label would have produced in the image's bin is compared with the shared one; an optimal assignment
(SciPy's Hungarian routine) gives each image the label that explains its bin best. Exact when the
forward pass is deterministic; with PRECODE's fresh noise it is a best guess.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attacks.base import Attack, AttackResult, AttackTarget, Progress
from attacks.inverting_gradients import resolve_labels
from precode_cli.errors import UserError
from precode_cli.models import imprint

RELATIVE_ZERO = 1e-7  # a bin difference smaller than this fraction of the largest bias gradient is rounding


class ImprintAttack(Attack):
    """`--method imprint`: the batch read off the imprint module's bins.

    The loss trace has one entry: the share (by norm) of the bins' bias differences that the kept
    hits leave out, 0 when every non-empty bin became a reconstruction.
    """

    name = "imprint"
    threat_model = "malicious-server"

    def __init__(self, iterations: int | None = None, lr: float | None = None, tv_weight: float | None = None) -> None:
        """Takes the CLI's common options for uniformity; the imprint attack uses none of them."""

    def params(self) -> dict[str, Any]:
        return {}

    def check(self, target: AttackTarget) -> None:
        super().check(target)  # a multi-step update mixes several gradients: refused
        self._bins(target)

    def run(self, target: AttackTarget, seed: int, progress: Progress | None = None) -> AttackResult:
        weight_grad, bias_grad = self._bins(target)
        weight, bias = weight_grad.detach().double(), bias_grad.detach().double()
        d_weight = weight - torch.cat([weight[1:], torch.zeros_like(weight[:1])])
        d_bias = bias - torch.cat([bias[1:], torch.zeros_like(bias[:1])])
        scale = float(bias.abs().max())
        hits = (d_bias.abs() > RELATIVE_ZERO * scale).nonzero().flatten() if scale > 0 else d_bias.new_zeros(0).long()
        batch = target.batch_size
        found = len(hits)
        if found > batch:
            hits = hits[d_bias[hits].abs().topk(batch).indices.sort().values]
        left_out = d_bias.clone()
        left_out[hits] = 0
        residual = left_out.norm() / d_bias.norm() if found else torch.ones((), dtype=torch.float64)
        recovered = (d_weight[hits] / d_bias[hits, None]).float().view(len(hits), *target.input_shape)
        device = weight_grad.device
        inputs = torch.zeros(batch, *target.input_shape, device=device)
        inputs[: len(hits)] = recovered.to(device)
        labels, source = resolve_labels(target)
        labels = match_labels(target, recovered, hits, d_bias[hits], labels, seed)
        if progress is not None:
            progress(1)
        return AttackResult(
            inputs=inputs, labels=labels, label_source=source, loss_trace=residual.float().view(1).cpu(),
            note=_note(found, len(hits), batch, weight.shape[0]),
        )

    def _bins(self, target: AttackTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared gradients of the imprint's bin weights and biases, after checking the attack applies."""
        block = imprint.find(target.model)
        if block is None:
            raise UserError("--method imprint reads the images off the imprint module a malicious server puts in "
                            "front of the model, but this dump's model has none; capture with --threat imprint.")
        weight_name, bias_name = f"{imprint.ATTRIBUTE}.bins.weight", f"{imprint.ATTRIBUTE}.bins.bias"
        if weight_name not in target.param_names or bias_name not in target.param_names:
            raise UserError("--method imprint needs the gradient of the imprint module's bins, which this dump "
                            "does not share.")
        weight_grad = target.shared_grads[target.param_names.index(weight_name)]
        bias_grad = target.shared_grads[target.param_names.index(bias_name)]
        if weight_grad.shape != (block.bins.out_features, math.prod(target.input_shape)):
            raise UserError(f"the imprint module's weight gradient has shape {list(weight_grad.shape)}, not "
                            f"[{block.bins.out_features}, {math.prod(target.input_shape)}].")
        return weight_grad, bias_grad


def match_labels(target: AttackTarget, images: torch.Tensor, bins: torch.Tensor, shared: torch.Tensor,
                 labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The batch's `labels` reordered so that label i belongs to recovered image i (the others follow).

    For each hit j and candidate class c: the output gradient of bin `bins[j]` that image j with label
    c gives under the client's loss, B times the batch mean, against the shared difference `shared[j]`
    (which is that gradient over B). The closest, relative to the shared value, wins, jointly.
    """
    from scipy.optimize import linear_sum_assignment

    count = images.shape[0]
    if count == 0 or len(labels.unique()) == 1:
        return labels
    model = target.model
    device = next(model.parameters()).device
    outputs: list[torch.Tensor] = []
    handle = imprint.find(model).bins.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    predicted = torch.empty(count, target.num_classes, dtype=torch.float64)
    classes = labels.unique().tolist()
    was_training = model.training
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.eval()  # the hits are not the client's batch, so its batch statistics are out of reach anyway
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # PRECODE draws its noise here: the same guess on every run
            for c in classes:  # one pass per class: a defense's loss term (PRECODE's KL) needs its own forward
                outputs.clear()
                logits = model(images.to(device))
                loss = target.loss_fn(model, logits, torch.full((count,), c, dtype=torch.int64, device=device))
                (grad,) = torch.autograd.grad(loss, outputs[0])  # mean over the hits: times count per image
                predicted[:, c] = grad.double().cpu()[torch.arange(count), bins.cpu()] * count
    finally:
        handle.remove()
        model.train(was_training)
    observed = shared.cpu() * target.batch_size
    candidates = labels.cpu().tolist()
    cost = (predicted[:, candidates] - observed[:, None]).abs() / observed.abs().clamp_min(1e-30)[:, None]
    rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=1e30, posinf=1e30).numpy())
    order = [candidates[c] for _, c in sorted(zip(rows.tolist(), cols.tolist()))]
    rest = [candidates[i] for i in sorted(set(range(len(candidates))) - set(cols.tolist()))]
    return torch.tensor(order + rest, dtype=torch.int64, device=labels.device)


def _note(found: int, kept: int, batch: int, bins: int) -> str:
    """What the bins gave, in a sentence for the report."""
    text = f"{found} of the imprint's {bins} bins held images of this batch of {batch}"
    if found > batch:
        return text + f"; kept the {batch} with the largest bias differences (gradient noise fills empty bins)."
    if kept < batch:
        return text + (f"; the other {batch - kept} reconstruction(s) are the mean image, for the images that "
                       "shared a bin.")
    return text + "."
