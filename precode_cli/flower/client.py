"""A ClientApp's local training with precode's model and defense stack, from the message the server sent.

`train_locally` is the Flower face of `precode_cli.stages.client.local_training`, the function
`precode capture-gradients --local-steps` simulates clients with: the same recipe fields, the same
batches, the same defense stack at every step (PRECODE's fresh noise, gradient-space defenses on
every step's gradient). A federation that trains with it deploys exactly what capture measured.
"""

from __future__ import annotations

import secrets

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from precode_cli.errors import UserError
from precode_cli.flower.records import ConfigKeys, arrays_of, config_of, recipe_from_config, to_record, to_tensors
from precode_cli.flower.setup import Setup
from precode_cli.local_training import LocalRecipe
from precode_cli.stages.client import local_training


def train_locally(msg: Message, setup: Setup, images: torch.Tensor, labels: torch.Tensor, *,
                  keys: ConfigKeys = ConfigKeys(), generator: torch.Generator | None = None,
                  arrayrecord_key: str | None = None) -> tuple[ArrayRecord, MetricRecord]:
    """Train on `images` (pixels in [0, 1], [n, C, H, W]) and `labels` ([n]) from the global arrays in `msg`,
    by the recipe in its config (`keys`); returns the reply's arrays (the received keys, in their order,
    with the trained weights) and metrics (`num-examples`, and the labels if `keys.labels` is set).

    `generator` draws the gradient-space defenses' noise (default: a fresh seed from the OS).
    """
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels) or not len(images):
        raise UserError(f"a client needs images [n, C, H, W] and labels [n] with n >= 1, not {list(images.shape)} "
                        f"and {list(labels.shape)}.")
    _, received = arrays_of(msg, arrayrecord_key)
    recipe = recipe_from_config(config_of(msg), len(images), keys)
    returned = local_update(setup, to_tensors(received), recipe, images, labels, generator)
    metrics = MetricRecord({keys.num_examples: len(images)})
    if keys.labels is not None:
        metrics[keys.labels] = [int(label) for label in labels[:recipe.num_examples]]
    return to_record(returned, like=received), metrics


def local_update(setup: Setup, global_arrays: dict[str, torch.Tensor], recipe: LocalRecipe, images: torch.Tensor,
                 labels: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The trained weights by trainable parameter name, starting from `global_arrays` (a state_dict)."""
    model, stack = setup.build()
    try:
        model.load_state_dict(global_arrays, strict=True)
    except RuntimeError as err:
        raise UserError(f"the server's arrays do not fit the client's model ({str(err).splitlines()[0]}).") from err
    model.train()
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    n = recipe.num_examples
    inputs = setup.normalize(images[:n].float())
    return local_training(model, stack, inputs, labels[:n].long(), recipe, generator)
