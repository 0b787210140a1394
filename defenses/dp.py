"""`dp`: DP-SGD, per-example gradient clipping and Gaussian noise, with a privacy accountant.

Source: Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016). Each example's
gradient is clipped to L2 norm `clip` (C), the clipped gradients are summed, Gaussian noise of
standard deviation sigma * C is added to the sum, and the result is divided by the batch size.
The same computation makes the training step (so the accuracy cost is real) and the gradient a
client shares in capture.

Per-example gradients come from `torch.func` (`vmap` over `grad` of a functional call), which
works on any model built from standard layers and keeps parameter names unchanged; examples
are processed in chunks so memory stays bounded. BatchNorm mixes the examples of a batch, so a
per-example gradient is undefined: models with BatchNorm are refused (use `--norm group`).
PRECODE's bottleneck draws its own noise sample for every example, as in a normal batch.

Accounting: Opacus's RDP accountant (`opacus.accountants.RDPAccountant`), the maintained
implementation of the sampled Gaussian mechanism's Rényi-DP analysis (Mironov et al. 2019); we
do not write our own. It assumes each step samples every training example independently with
probability q = batch size / training-set size (Poisson sampling); the trainer draws shuffled
fixed-size batches instead, the usual approximation, which docs/defenses.md states. Epsilon is
for the whole training run at `delta`; a single shared gradient in capture is one step of it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defenses.base import Defense, LossFn, number_in
from precode_cli.errors import UserError

DEFAULT_CLIP = 1.0
DEFAULT_SIGMA = 1.0
DEFAULT_DELTA = 1e-5
MAX_CHUNK_FLOATS = 64 * 2**20  # per-example gradients held at once: about 256 MB of float32


def per_example_gradients(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn, names: list[str],
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each example's gradient [B, *param shape] by name, its loss [B] and its logits [B, classes]."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def one_example(trainable: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        logits = functional_call(model, ({**frozen, **trainable}, buffers), (x.unsqueeze(0),))
        loss = loss_fn(model, logits, y.unsqueeze(0))
        return loss, (loss.detach(), logits.squeeze(0).detach())

    grads, (losses, logits) = vmap(grad(one_example, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
        params, inputs, labels)
    return grads, losses, logits


class DPSGD(Defense):
    """`--defense dp`: clip each example's gradient to `clip`, add N(0, (sigma * clip)^2) to the sum, average."""

    name = "dp"
    cli_options = {"clip": "dp_clip", "sigma": "dp_sigma", "delta": "dp_delta"}

    def __init__(self, clip: float = DEFAULT_CLIP, sigma: float = DEFAULT_SIGMA, delta: float = DEFAULT_DELTA) -> None:
        self.clip = number_in(clip, "--dp-clip", 0)
        self.sigma = number_in(sigma, "--dp-sigma", 0)
        self.delta = number_in(delta, "--dp-delta", 0, 1)
        self.last_norms: torch.Tensor | None = None  # per-example norms before clipping, of the latest batch

    def params(self) -> dict[str, Any]:
        return {"clip": self.clip, "sigma": self.sigma, "delta": self.delta}

    def apply_to_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        batch_norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            raise UserError(f"dp clips each example's gradient, but BatchNorm ({batch_norms[0]}) mixes the examples "
                            "of a batch; use a model without it (e.g. resnet18 --norm group).")
        return model

    def compute_gradients(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn,
        names: list[str], generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        shapes = dict(model.named_parameters())
        floats = sum(shapes[n].numel() for n in names)
        chunk = max(1, MAX_CHUNK_FLOATS // max(floats, 1))
        total = {n: torch.zeros_like(shapes[n], dtype=torch.float32) for n in names}
        losses, logits, norms = [], [], []
        for x, y in zip(inputs.split(chunk), labels.split(chunk)):
            grads, loss, out = per_example_gradients(model, x, y, loss_fn, names)
            norm = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1), dim=1)
            factor = (self.clip / (norm + 1e-6)).clamp(max=1.0)
            for n, g in grads.items():
                total[n] += torch.einsum("b,b...->...", factor, g.float())
            losses.append(loss)
            logits.append(out)
            norms.append(norm)
        batch = len(inputs)
        shared = {}
        for n in names:
            noise = torch.randn(total[n].shape, generator=generator, device=generator.device)
            shared[n] = ((total[n] + noise.to(total[n].device) * (self.sigma * self.clip)) / batch).to(shapes[n].dtype)
        self.last_norms = torch.cat(norms)
        return torch.cat(losses).mean(), torch.cat(logits), shared

    def privacy(self, steps: int, sample_rate: float) -> dict[str, Any]:
        return {
            "epsilon": epsilon(self.sigma, sample_rate, steps, self.delta),
            "delta": self.delta, "noise_multiplier": self.sigma, "sample_rate": sample_rate, "steps": steps,
            "accountant": "opacus RDPAccountant (assumes Poisson sampling at sample_rate)",
        }


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` DP-SGD steps at `sample_rate` and `noise_multiplier`, for `delta` (Opacus RDP)."""
    if steps == 0:
        return 0.0
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as err:  # a dependency, but say what to do if someone removed it
        raise UserError("dp's privacy accountant needs Opacus; pip install opacus.") from err
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))
