"""CVB: the Convolutional Variational Bottleneck (Scheliga, Mäder, Seeland, arXiv 2309.04515).

The PRECODE authors' successor to PRECODE. Their analysis: a variational bottleneck protects the
gradients of the layers after its sample (they depend on noise the server never sees), but not of
the layers before it, which is why `ig-adaptive` breaks PRECODE at its usual place before the
output layer. The bottleneck must sit early, where PRECODE's dense encoder would need millions of
weights for a feature map. CVB keeps the map a map: a convolution encodes it to the mean and
(softplus) standard deviation of a Gaussian per latent channel and position, a fresh
reparameterised sample is drawn on every forward pass, and a 1x1 convolution decodes the sample
back to the input's channels. By default it goes after the first convolutional block.

Written after the authors' code (github.com/dAI-SY-Group/ConvolutionalVariationalBottleneck,
`FullyConvolutionalVariationalBottleneck`): a 5x5 "same" convolution without bias for the mean
and for the standard deviation (here one convolution with 2K output channels), the standard
deviation's pre-activation clipped to [-5, 5] before softplus, a 1x1 decoder without bias,
K = half the input's channels (8 below 8 channels), beta = 0.1 (their CNN's), placed after the first
conv block. One deliberate difference: their loss applies the log-variance form of the KL to the
softplus output, i.e. the KL of a distribution other than the one sampled, whose minimum drives
the noise down to its floor; here the loss is by default the KL of the Gaussian actually sampled, with
their reduction (summed over latent channels, averaged over batch and positions, in nats).
`kl="authors"` (`--cvb-kl authors`) takes their term as written, for comparison with their figures.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense, number_in
from defenses.precode import insert_before, kl_to_standard_normal
from precode_cli.errors import UserError
from precode_cli.inspection import called_modules

DEFAULT_BETA = 0.1
KERNEL_SIZE = 5
STD_CLIP = 5.0  # the standard deviation's pre-activation is clipped to [-5, 5]: std in [0.0067, 5.0067]
MIN_CHANNELS = 8
KL_TERMS = ("gaussian", "authors")


def adaptive_channels(in_channels: int) -> int:
    """The authors' default latent channel count ("adaptive"): half the input's channels, or 8 for a
    map of fewer than 8 channels."""
    return in_channels // 2 if in_channels >= MIN_CHANNELS else MIN_CHANNELS


class ConvolutionalBottleneck(nn.Module):
    """Conv encoder -> mean, softplus std per channel and position -> sample -> 1x1 conv decoder.

    Attacks find it as they find PRECODE's VB (`stochastic_bottleneck`, `k`, `decoder`, `noise`;
    attacks/optimization.py `bottlenecks`): `k` is the number of latent Gaussians per example,
    channels x height x width, and `noise` may be given flat, [B, k], or as [B, K, H, W].
    """

    stochastic_bottleneck = True

    def __init__(self, feature_shape: tuple[int, ...], channels: int | None = None,
                 beta: float = DEFAULT_BETA, kl: str = "gaussian") -> None:
        super().__init__()
        if len(feature_shape) != 3:
            raise UserError(f"CVB is convolutional and needs a channels x height x width feature map, but its place "
                            f"receives features of shape {list(feature_shape)}; name a place inside the convolutional "
                            "layers with --cvb-at.")
        in_channels, height, width = (int(n) for n in feature_shape)
        self.feature_shape = (in_channels, height, width)
        self.channels = int(channels) if channels is not None else adaptive_channels(in_channels)
        self.k = self.channels * height * width
        self.beta = beta
        self.kl = kl
        self.encoder = nn.Conv2d(in_channels, 2 * self.channels, KERNEL_SIZE, padding="same", bias=False)
        self.decoder = nn.Conv2d(self.channels, in_channels, 1, bias=False)
        self.last_kl: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None  # a standard-normal draw to use instead of a fresh one (ig-noise)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        stats = self.encoder(features)
        mean = stats[:, : self.channels]
        std = F.softplus(stats[:, self.channels :].clamp(-STD_CLIP, STD_CLIP))
        noise = self.noise.reshape(std.shape) if self.noise is not None else torch.randn_like(std)
        self.last_kl = kl_per_position(mean, std) if self.kl == "gaussian" else authors_kl_term(mean, std)
        return self.decoder(mean + std * noise)

    def extra_repr(self) -> str:
        return f"feature_shape={self.feature_shape}, channels={self.channels}, beta={self.beta}, kl={self.kl}"


def kl_per_position(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, I)) in nats, summed over latent channels, averaged over batch and positions.

    The authors' reduction (a loss that does not grow with the feature map's size), so beta means
    the same; PRECODE's KL in bits is reused on the positions as examples.
    """
    channels = mean.shape[1]
    per_position = (t.movedim(1, -1).reshape(-1, channels) for t in (mean, std))
    return kl_to_standard_normal(*per_position) * math.log(2)


def authors_kl_term(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The authors' term as written: mean over batch and positions of -1/2 sum_c (1 + s - m^2 - e^s), with s
    the softplus standard deviation in the place of a log-variance. Its minimum over s is at s = 0, so
    training with it drives the noise toward its floor (softplus(-5) = 0.0067)."""
    return torch.mean(-0.5 * torch.sum(1 + std - mean.pow(2) - std.exp(), dim=1))


def cvb_loss(model: nn.Module) -> torch.Tensor:
    """beta * KL of every CVB in the model, from its most recent forward pass."""
    terms = [m.beta * m.last_kl for m in model.modules()
             if isinstance(m, ConvolutionalBottleneck) and m.last_kl is not None]
    if not terms:
        raise RuntimeError("cvb_loss called before a forward pass through the CVB")
    return torch.stack(terms).sum()


def after_first_conv_block(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Where CVB goes by default: in front of the second convolution the forward pass calls, or of the
    outermost block that begins there (resnet18: `layer1`, after the stem), so that everything after the
    first conv block, skip connections included, sees the sampled features."""
    inside = [name for name, m in model.named_modules() if getattr(m, "stochastic_bottleneck", False)]

    def within(name: str, outer: str) -> bool:
        return name == outer or name.startswith(outer + ".")

    convs = [name for name in called_modules(model, input_shape, lambda m: isinstance(m, nn.Conv2d))
             if not any(within(name, b) for b in inside)]
    first = convs[0] if convs else None
    second = next((name for name in convs if name != first), None)
    if second is None:
        raise UserError("the model calls only one convolution, so it has no place after its first conv block; "
                        "name the place of CVB with --cvb-at.")
    order = called_modules(model, input_shape, lambda m: True)
    parts = second.split(".")
    for depth in range(1, len(parts) + 1):
        candidate = ".".join(parts[:depth])
        if (not within(first, candidate) and order.count(candidate) == 1
                and order.index(candidate) > order.index(first)):
            return candidate
    return second


class CVB(Defense):
    """`--defense cvb`: the convolutional bottleneck after the first conv block (or at `at`), beta * KL in the loss."""

    name = "cvb"
    cli_options = {"channels": "cvb_channels", "beta": "cvb_beta", "at": "cvb_at", "kl": "cvb_kl"}

    def __init__(self, channels: int | None = None, beta: float = DEFAULT_BETA, at: str | None = None,
                 kl: str = "gaussian") -> None:
        if kl not in KL_TERMS:
            raise UserError(f"--cvb-kl must be one of {', '.join(KL_TERMS)}, not {kl!r}.")
        self.kl = kl
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise UserError(f"--cvb-channels must be a whole number of at least 1, not {channels!r}.")
        self.channels = channels
        self.beta = number_in(beta, "--cvb-beta", 0, low_included=True)
        self.at = at

    def params(self) -> dict[str, Any]:
        return {"channels": self.channels, "beta": self.beta, "at": self.at, "kl": self.kl}

    def apply_to_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            raise UserError("the model has no nn.Conv2d layer, and CVB is a convolutional bottleneck for feature maps; "
                            "use --defense precode on this model.")
        if self.at is None:
            self.at = after_first_conv_block(model, input_shape)  # files record the place actually used
        built: list[ConvolutionalBottleneck] = []

        def build(shape: tuple[int, ...]) -> nn.Module:
            built.append(ConvolutionalBottleneck(shape, channels=self.channels, beta=self.beta, kl=self.kl))
            return built[-1]

        model = insert_before(model, input_shape, self.at, build, what="CVB")
        self.channels = built[0].channels  # the adaptive default, resolved, is what files record
        return model

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        return cvb_loss(model)
