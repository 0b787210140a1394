"""What a Flower server and its clients must agree on: the model, its defenses and how images become inputs.

The server records it in every update file (the attacker's knowledge of the architecture); the
clients build the same model from it and normalise their images with its data spec. It is made
once, the way `precode capture-gradients` makes an untrained model's (same names, same options),
so an update recorded from Flower and a capture of the same model describe it identically.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defenses import DefenseStack, stack_from_cli
from precode_cli import data, models
from precode_cli.stages import profiles


@dataclass(frozen=True)
class Setup:
    """The model spec, the defense list (as files record it) and the data spec a federation shares."""

    model_spec: dict[str, Any]
    defense_specs: list[dict[str, Any]]
    data_spec: dict[str, Any]
    trusted_builder: str | None = None  # your own `package.module:builder`, trusted because you named it

    @classmethod
    def create(cls, model: str = "mlp", defense: str | list[str] | None = None, dataset: str = "builtin", *,
               data_dir: Path | str | None = None, image_size: int | None = None, channels: int | None = None,
               width: int | None = None, norm: str | None = None, stats: str | None = None,
               **defense_options: Any) -> "Setup":
        """As `precode capture-gradients --model M --defense D --dataset S ...` would describe an untrained model;
        defense options by their command-line names (`noise_scale=0.01`, `precode_k=256`)."""
        stack = stack_from_cli(defense, **defense_options)
        location = {"data_dir": Path(data_dir).resolve() if data_dir is not None else None,
                    "image_size": image_size, "channels": channels}
        spec = data.with_published_stats(data.data_spec(dataset, **location), stats)
        model_spec = models.make_spec(model, tuple(spec["input_shape"]), spec["num_classes"], width=width, norm=norm)
        trusted = model if models.is_user_builder(model) else None
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            stack.build_model(model_spec, trusted_builder=trusted)  # resolves what files record (ppp's parameters)
        return cls(model_spec=model_spec, defense_specs=stack.specs(), data_spec=spec, trusted_builder=trusted)

    def to_json(self) -> str:
        """One string, e.g. to pass to Flower apps through a run config."""
        return json.dumps({"model": self.model_spec, "defense": self.defense_specs, "data": self.data_spec,
                           "trusted_builder": self.trusted_builder}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Setup":
        value = json.loads(text)
        return cls(value["model"], value["defense"], value["data"], value.get("trusted_builder"))

    def stack(self) -> DefenseStack:
        """A fresh defense stack (defenses keep per-model state, so each model gets its own)."""
        return DefenseStack.from_specs(copy.deepcopy(self.defense_specs))

    def build(self) -> tuple[nn.Module, DefenseStack]:
        """The model with every defense applied (fresh weights) and the stack that trains it."""
        stack = self.stack()
        return stack.build_model(self.model_spec, trusted_builder=self.trusted_builder), stack

    def trainable_names(self) -> list[str]:
        """The trainable parameters, in model order: what a client trains and sends back (`returned.*`)."""
        return [name for name, (_, trainable) in self._profile().params.items() if trainable]

    def parameter_names(self) -> list[str]:
        return list(self._profile().params)

    def buffer_names(self) -> list[str]:
        return list(self._profile().buffers)

    def batch_data(self, n: int) -> dict[str, Any]:
        """The `data` of a file about a client with `n` examples."""
        return {**self.data_spec, "batch_size": n}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel-space images in [0, 1] to the model's inputs."""
        return data.normalize(images, self.data_spec)

    def _profile(self) -> Any:
        return profiles.profile(self.model_spec, self.defense_specs, self.trusted_builder)
