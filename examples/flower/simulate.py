"""Run examples/flower/app.py in Flower's simulation (Ray): one federation, its updates and truth files.

Usage: python examples/flower/simulate.py --defense none|precode --out DIR [--clients 4 --rounds 2
--images 1 --local-steps 1 --lr 0.1 --seed 0 --record R ... --force]. Writes
DIR/updates/round-RRR-node-N.safetensors (what the server recorded, of the --record rounds) and
DIR/truth/round-RRR-node-N.truth.safetensors (the clients' real images behind them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _name, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                      ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"), ("RAY_DEDUP_LOGS", "0")):
    os.environ.setdefault(_name, _value)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from app import Partition, client_app, server_app  # noqa: E402
from precode_cli import data  # noqa: E402
from precode_cli.flower import Setup  # noqa: E402


def partitions(clients: int, images: int) -> list[Partition]:
    """Client c holds images c*images .. (c+1)*images - 1 of the built-in training split."""
    train = data.load("builtin", "train")
    return [(train.images[a:a + images], train.labels[a:a + images], torch.arange(a, a + images))
            for a in range(0, clients * images, images)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", default="none")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=1, help="images per client")
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", type=int, nargs="*", help="the rounds the server records (default: all)")
    parser.add_argument("--force", action="store_true", help="overwrite files of an earlier run in --out")
    args = parser.parse_args()

    started = time.time()
    setup = Setup.create("mlp", args.defense)
    updates, truth = args.out / "updates", args.out / "truth"
    run_simulation(
        server_app=server_app(setup, updates, clients=args.clients, rounds=args.rounds, lr=args.lr,
                              local_steps=args.local_steps, seed=args.seed, record=args.record, force=args.force),
        client_app=client_app(setup, partitions(args.clients, args.images), truth, record=args.record, force=args.force),
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},  # one actor: clients are tiny
    )
    recorded = sorted(updates.glob("*.safetensors"))
    truths = sorted(truth.glob("*.truth.safetensors"))
    expected = args.clients * (args.rounds if args.record is None else len(set(args.record)))
    if len(recorded) != expected or len(truths) != expected:
        sys.exit(f"simulate.py: expected {expected} updates and truth files, found {len(recorded)} and {len(truths)} "
                 f"in {args.out}; see Flower's log above.")
    print(f"simulate.py: {len(recorded)} updates and truth files in {args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
