"""Flower's records as precode sees them: arrays as torch tensors, the config as a local training recipe.

One module for both sides, so the recipe a client trains by (`client.train_locally`) and the recipe
the server records (`recorder.RecordingStrategy`) are read from the same config by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from precode_cli.errors import UserError
from precode_cli.local_training import LocalRecipe, steps_for_epochs


@dataclass(frozen=True)
class ConfigKeys:
    """Where the recipe lives in the messages: keys of the ConfigRecord the server sends for training
    (None: never sent) and of the MetricRecord a client replies with."""

    lr: str = "lr"
    steps: str | None = "local-steps"
    epochs: str | None = "local-epochs"
    batch_size: str | None = "batch-size"
    momentum: str | None = "momentum"
    weight_decay: str | None = "weight-decay"
    round: str = "server-round"  # FedAvg and its kin put the round here
    num_examples: str = "num-examples"  # reply metrics; FedAvg weights by it
    # Reply metrics: a list of the client's labels, if your clients share them. FedAvg averages every metric, lists
    # too, so a strategy that receives labels needs a train_metrics_aggr_fn that leaves this key out.
    labels: str | None = None


def update_stem(server_round: int, node_id: int | str) -> str:
    """The name (without .safetensors) of the update a node sent in a round; its truth file shares it."""
    return f"round-{int(server_round):03d}-node-{node_id}"


def single(records: dict[str, Any], kind: str, key: str | None = None) -> tuple[str, Any]:
    """The record under `key`, or the only one of its kind; one sentence when that is ambiguous."""
    if key is not None:
        if key not in records:
            raise UserError(f"the message has no {kind} {key!r} (it has: {', '.join(records) or 'none'}).")
        return key, records[key]
    if len(records) != 1:
        raise UserError(f"the message has {len(records)} {kind}s ({', '.join(records) or 'none'}); name the one to "
                        "use (arrayrecord_key=...).")
    return next(iter(records.items()))


def arrays_of(message: Message, key: str | None = None) -> tuple[str, ArrayRecord]:
    """The message's ArrayRecord (the model's arrays) and its key."""
    return single(message.content.array_records, "ArrayRecord", key)


def config_of(message: Message) -> dict[str, Any]:
    """The message's ConfigRecord as a plain dict ({} when it sends none)."""
    configs = message.content.config_records
    if not configs:
        return {}
    return dict(single(configs, "ConfigRecord", "config" if "config" in configs else None)[1])


def metrics_of(message: Message) -> dict[str, Any]:
    """The reply's MetricRecord as a plain dict ({} when it has none)."""
    metrics = message.content.metric_records
    if not metrics:
        return {}
    return dict(single(metrics, "MetricRecord", "metrics" if "metrics" in metrics else None)[1])


def to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as torch tensors by name (copies, CPU), in the record's order."""
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()}


def to_record(tensors: dict[str, torch.Tensor], like: ArrayRecord | None = None) -> ArrayRecord:
    """Tensors as an ArrayRecord; with `like`, its keys and order, keeping its Arrays where `tensors` has none."""
    names = list(like.keys()) if like is not None else list(tensors)
    arrays = {}
    for name in names:
        if name in tensors:
            arrays[name] = Array(np.ascontiguousarray(tensors[name].detach().cpu().numpy()))
        else:
            arrays[name] = like[name]  # type: ignore[index]
    return ArrayRecord(arrays)


def num_examples(metrics: dict[str, Any], keys: ConfigKeys) -> int | None:
    value = metrics.get(keys.num_examples)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value) \
        else None


def recipe_from_config(config: dict[str, Any], examples: int | None, keys: ConfigKeys = ConfigKeys(),
                       assume: dict[str, Any] | None = None) -> LocalRecipe:
    """The local training recipe the server's config asks of a client with `examples` examples.

    Fields found in `config` (and the client's example count, when given) are marked known; the rest come
    from `assume`, else LocalRecipe's defaults (one step of plain SGD on all examples at once), and
    are the attacker's assumptions. A client trains on its first steps * batch_size examples when
    that is fewer than it has, so the recipe counts only those (`num_examples`).
    """
    assume = dict(assume or {})
    known: list[str] = []

    def pick(field: str, key: str | None, kind: type) -> Any:
        if key is not None and key in config:
            value = config[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                raise UserError(f"the config's {key!r} is {value!r}, not a{'n' if kind is int else ''} "
                                f"{kind.__name__} as the local recipe's {field} must be.")
            known.append(field)
            return value
        return assume.get(field)

    lr = pick("lr", keys.lr, float)
    if lr is None:
        raise UserError(f"the server's config has no learning rate {keys.lr!r} and none is assumed; send it in the "
                        "train config, or pass assume={'lr': ...}.")
    n = examples if examples is not None else assume.get("num_examples")
    if n is None:
        raise UserError(f"the client reported no {keys.num_examples!r} and none is assumed; reply with it in the "
                        "MetricRecord, or pass assume={'num_examples': ...}.")
    if examples is not None:
        known.append("num_examples")
    steps, epochs = pick("steps", keys.steps, int), pick("epochs", keys.epochs, int)
    batch = pick("batch_size", keys.batch_size, int) or n
    batch = min(batch, n)
    momentum, decay = pick("momentum", keys.momentum, float), pick("weight_decay", keys.weight_decay, float)
    if "steps" in known and "epochs" in known:
        raise UserError(f"the config sets both {keys.steps!r} and {keys.epochs!r}; a client trains by one of them.")
    if epochs is not None and ("epochs" in known or steps is None):  # what the server sent beats an assumption
        steps = steps_for_epochs(epochs, n, batch)
        if {"epochs", "batch_size", "num_examples"} <= set(known):
            known.append("steps")
    elif steps is not None:
        epochs = None
    else:
        steps = -(-n // batch)  # one pass over the examples
    trained = min(n, steps * batch)
    recipe = LocalRecipe(lr=lr, steps=steps, batch_size=min(batch, trained), num_examples=trained,
                         momentum=momentum or 0.0, weight_decay=decay or 0.0, epochs=epochs,
                         shuffle=bool(assume.get("shuffle", False)),
                         labels_per_step=bool(assume.get("labels_per_step", False)),
                         optimizer=assume.get("optimizer", "sgd"))
    return replace(recipe, known=tuple(field for field in recipe.to_meta() if field in known))


def plain(record: dict[str, Any]) -> dict[str, Any]:
    """A record's JSON-able values (bytes dropped), for the provenance a file keeps."""
    return {key: value for key, value in record.items()
            if not isinstance(value, bytes) and not (isinstance(value, list) and any(isinstance(v, bytes) for v in value))}
