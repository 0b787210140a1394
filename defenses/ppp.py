"""`ppp`: PRECODE plus partial gradient perturbation (clip and Gaussian noise on part of the gradient).

Source: Scheliga, Mäder and Seeland, "Combining Variational Modeling with Partial Gradient
Perturbation to Prevent Deep Gradient Leakage" (the PRECODE authors' follow-up, 2022). PRECODE's
variational bottleneck (VB) already stops optimisation attacks that must reproduce the client's
forward pass; what is still exposed is the gradient of the layers that see the data before the
stochastic sample: the layers in front of the VB and the VB's encoder, from which analytic
attacks read inputs (e.g. the first Linear layer's weight gradient divided by its bias gradient).
PPP clips those gradients and adds Gaussian noise, as DP-SGD does, but only there, so the
layers after the sample (decoder, classifier) train with exact gradients and accuracy suffers
much less than with noise everywhere.

What is perturbed: by default every parameter of the modules that one dry forward pass calls
before the VB's decoder (`<at>.bottleneck.decoder`): the feature extractor in front of the VB and
`<at>.bottleneck.encoder.*` (a module also called after the decoder counts as before); or
exactly the parameter names given as `params`. Those gradients are clipped jointly to L2 norm
`clip` (scaled by clip / norm when their joint norm exceeds clip) and then get N(0, (sigma *
clip)^2) noise drawn from the caller's generator; every other gradient is returned as the very
same tensor (bit-identical). Clipping is of the batch's shared gradient, not per example, so this
is not a DP guarantee. The defaults of clip and sigma are starting points to tune, not the
paper's values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defenses.base import number_in
from defenses.precode import DEFAULT_BETA, DEFAULT_K, Precode
from precode_cli.errors import UserError
from precode_cli.inspection import called_modules

DEFAULT_CLIP = 1.0
DEFAULT_SIGMA = 0.1


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def parameters_before_decoder(model: nn.Module, input_shape: tuple[int, ...], at: str) -> list[str]:
    """Names of the parameters of modules called before `<at>.bottleneck.decoder`, in model order."""
    decoder = f"{at}.bottleneck.decoder"
    order = called_modules(model, input_shape, _owns_parameters)
    if decoder not in order:
        raise UserError(f"the model never calls PRECODE's decoder {decoder!r}; ppp cannot tell which layers come before it.")
    before = set(order[: order.index(decoder)])
    names = []
    for module_name, module in model.named_modules():
        if module_name in before:
            names += [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return [n for n, _ in model.named_parameters() if n in set(names)]


class PartialPerturbation(Precode):
    """`--defense ppp`: PRECODE's VB (k, beta, at) plus clip-and-noise on the gradients in front of the sample."""

    name = "ppp"
    cli_options = {**Precode.cli_options, "clip": "ppp_clip", "sigma": "ppp_sigma", "params": "ppp_params"}

    def __init__(self, k: int = DEFAULT_K, beta: float = DEFAULT_BETA, at: str | None = None,
                 clip: float = DEFAULT_CLIP, sigma: float = DEFAULT_SIGMA, params: list[str] | str | None = None) -> None:
        super().__init__(k=k, beta=beta, at=at)
        clip_value = number_in(clip, "--ppp-clip", 0)
        sigma_value = number_in(sigma, "--ppp-sigma", 0, low_included=True)
        if isinstance(params, str):  # the command line's comma-separated form
            params = [name.strip() for name in params.split(",") if name.strip()]
        if params is not None and (not isinstance(params, (list, tuple)) or not all(isinstance(p, str) for p in params)
                                   or not params):
            raise UserError(f"--ppp-params must be a non-empty list of parameter names, not {params!r}.")
        self.clip, self.sigma = clip_value, sigma_value
        self.param_names = list(params) if params is not None else None
        self.perturbed: list[str] | None = self.param_names

    def params(self) -> dict[str, Any]:
        return {**super().params(), "clip": self.clip, "sigma": self.sigma, "params": self.param_names}

    def apply_to_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        model = super().apply_to_model(model, input_shape)
        if self.param_names is None:
            self.perturbed = parameters_before_decoder(model, input_shape, self.at)
            self.param_names = list(self.perturbed)  # files record the parameters actually perturbed
        else:
            known = dict(model.named_parameters())
            unknown = [n for n in self.param_names if n not in known]
            if unknown:
                raise UserError(f"--ppp-params names {', '.join(unknown)}, which the model with PRECODE does not have.")
        return model

    def perturb_gradients(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.perturbed is None:
            raise RuntimeError("ppp: apply_to_model must run before perturb_gradients (it finds the layers to perturb)")
        chosen = [n for n in self.perturbed if n in grads]
        if not chosen:
            return dict(grads)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[n].double()) for n in chosen]))
        factor = self.clip / norm.item() if norm.item() > self.clip else 1.0
        shared = dict(grads)
        for n in chosen:
            grad = grads[n] * factor
            if self.sigma > 0:
                noise = torch.randn(grad.shape, generator=generator, device=generator.device)
                grad = grad + (noise * (self.sigma * self.clip)).to(grad.device, grad.dtype)
            shared[n] = grad
        return shared


PPP = PartialPerturbation
