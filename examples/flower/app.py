"""A Flower app (ServerApp + ClientApp) whose server records what it receives, for precode to attack.

The federation trains the PRECODE paper's MLP (with or without PRECODE) with FedAvg. Each client
holds a few images of the built-in dataset and trains `local-steps` steps of SGD on them with
precode's helper (`train_locally`, the same local training as `precode capture-gradients
--local-steps`). The server wraps FedAvg in precode's `RecordingStrategy`, which writes every
client's reply as an update file and hands it on unchanged. As this is a simulation, a client mod
writes the matching truth files (the clients' real images) so that `precode evaluate` can score the
attack; a real deployment never enables it.

`simulate.py` runs the app in Flower's simulation; `run.sh` runs the whole audit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from precode_cli.flower import RecordingStrategy, Setup, train_locally, truth_mod

Partition = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images in [0, 1], labels, positions in the split


def server_app(setup: Setup, updates: Path, *, clients: int, rounds: int, lr: float, local_steps: int,
               seed: int, record: list[int] | None = None, force: bool = False) -> ServerApp:
    """FedAvg over all `clients` for `rounds` rounds; the train replies of the rounds in `record` (None: all)
    are recorded into `updates`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(seed)
        model, _ = setup.build()  # untrained, as in the PRECODE paper
        strategy = RecordingStrategy(
            FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients),
            updates, setup, rounds=record, force=force)
        config = ConfigRecord({"lr": lr, "local-steps": local_steps, "batch-size": 1})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                       train_config=config)

    return app


def client_app(setup: Setup, partitions: list[Partition], truth: Path, record: list[int] | None = None,
               force: bool = False) -> ClientApp:
    """Clients that train on their partition (by Flower's `partition-id`); the truth files of the rounds in
    `record` (None: all) go to `truth`."""

    def examples(context: Context) -> Partition:
        return partitions[int(context.node_config["partition-id"])]

    # The truth mod is the outermost mod and the only one here; a client that shares a defended update would
    # list defense_mod(...) after it.
    app = ClientApp(mods=[truth_mod(truth, examples, setup, enabled=True, rounds=record, split="train",
                                    force=force)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        images, labels, _ = examples(context)
        arrays, metrics = train_locally(msg, setup, images, labels)
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app
