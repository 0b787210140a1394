"""The imprint module a malicious server puts in front of a model ("Robbing the Fed", Fowl et al., ICLR 2022).

A Linear layer of N bins sees the flattened input. Every row holds the same measurement direction w
(`mean`: the mean of the normalised pixels; `random`: a random unit direction drawn from the seed),
and bin i's bias is -o_i, where o_1 < ... < o_{N-1} are the i/N quantiles of a standard normal, the
measurement's distribution as the server models it (normalised pixels have mean 0 and variance 1,
so w.x has variance 1 on average over random unit directions, and at most 1 for the mean), and o_0
lies far below any image, so bin 0 holds them all. After a ReLU, bin i is active for exactly the
images whose measurement exceeds o_i. A second Linear maps the bins back to the input's shape, every
value the mean of the bins' outputs (centred at a zero measurement), so the rest of the model runs
unchanged on it.

Because the back layer's columns are equal, image j's output gradient dL/dy_i is one number c_j for
every active bin i. Bin i's weight gradient is therefore the sum of c_j x_j over the images above
o_i and its bias gradient the sum of their c_j: the difference of consecutive bins holds only the
images between o_i and o_{i+1}, and when one image is alone there, the weight difference divided by
the bias difference is that image, exactly (attacks/imprint.py reads it off).

The module is `model.imprint`, run by a forward pre-hook on the model rather than a wrapper, so every
other parameter keeps its name: a trained run's state loads unchanged and --precode-at, --soteria-layer
and --ignore-layers name the same layers. Building it draws nothing from the global random state, so
the rest of the model is initialised as it would be without it.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import torch
from torch import nn

from precode_cli.errors import UserError

MEASUREMENTS = ("mean", "random")
ATTRIBUTE = "imprint"  # the submodule's name; its parameters are imprint.bins.* and imprint.back.*
FLOOR = -10.0  # o_0: below any measurement of a normalised image, so bin 0 holds every image


def offsets(bins: int) -> list[float]:
    """o_0 < o_1 < ... < o_{N-1}: FLOOR, then the i/N quantiles of a standard normal."""
    normal = NormalDist()
    return [FLOOR] + [normal.inv_cdf(i / bins) for i in range(1, bins)]


def direction(measurement: str, size: int, seed: int) -> torch.Tensor:
    """The measurement's unit of the flattened input: all 1/size (mean), or a seeded random unit vector."""
    if measurement == "mean":
        return torch.full((size,), 1.0 / size, dtype=torch.float64)
    if measurement == "random":
        drawn = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return drawn / drawn.norm()
    raise UserError(f"unknown imprint measurement {measurement!r}; choose one of: {', '.join(MEASUREMENTS)}.")


class ImprintBlock(nn.Module):
    """Linear(D, N) bins -> ReLU -> Linear(N, D) back to the input's shape; see the module's docstring."""

    def __init__(self, input_shape: tuple[int, ...], bins: int, measurement: str = "mean", seed: int = 0) -> None:
        super().__init__()
        if not (isinstance(bins, int) and bins >= 2):
            raise UserError(f"the imprint module needs at least 2 bins, not {bins!r}.")
        self.input_shape, self.measurement = tuple(input_shape), measurement
        size = math.prod(self.input_shape)
        device = torch.empty(0).device  # the meta device when measured without allocating (stages/profiles.py)
        # made on the meta device and filled below: nn.Linear's own initialisation would draw from the global RNG
        self.bins = nn.Linear(size, bins, device="meta").to_empty(device=device)
        self.back = nn.Linear(bins, size, device="meta").to_empty(device=device)
        if device.type != "meta":
            self._fill(direction(measurement, size, seed), offsets(bins))

    @torch.no_grad()
    def _fill(self, unit: torch.Tensor, cuts: list[float]) -> None:
        cut = torch.tensor(cuts, dtype=torch.float64)
        self.bins.weight.copy_(unit.expand_as(self.bins.weight))
        self.bins.bias.copy_(-cut)
        self.back.weight.fill_(1.0 / len(cuts))
        self.back.bias.fill_(-float(torch.relu(-cut).mean()))  # a zero measurement maps to zeros

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        binned = torch.relu(self.bins(inputs.flatten(1)))
        return self.back(binned).view(inputs.shape[0], *self.input_shape)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, bins={self.bins.out_features}, measurement={self.measurement}"


def _through_imprint(model: nn.Module, args: tuple) -> tuple:
    """The model's forward pre-hook: its input goes through the imprint module first."""
    return (getattr(model, ATTRIBUTE)(args[0]), *args[1:])


def attach(model: nn.Module, spec: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """Put the imprint module that `spec` (a model spec's `imprint`) describes in front of `model`."""
    if hasattr(model, ATTRIBUTE):
        raise UserError(f"the model already has an attribute named {ATTRIBUTE!r}, where the imprint module goes; "
                        "rename it in your builder.")
    block = ImprintBlock(tuple(input_shape), int(spec["bins"]), str(spec["measurement"]), int(spec["seed"]))
    model.add_module(ATTRIBUTE, block)
    model.register_forward_pre_hook(_through_imprint)
    return model


def find(model: nn.Module) -> ImprintBlock | None:
    """The model's imprint module, or None when the server sent an honest model."""
    block = getattr(model, ATTRIBUTE, None)
    return block if isinstance(block, ImprintBlock) else None
