"""precode in Flower: record what a FedAvg server receives, write the truth beside it, deploy precode's defenses.

An optional extra (`pip install "precode[flower]"`, Flower >= 1.21 with its Message API). The pieces,
one job per module:

    setup.py         Setup: the model, defenses and data spec a server and its clients share
    records.py       Flower records <-> torch tensors; the local recipe from the config the server sent
    recorder.py      RecordingStrategy: wraps any strategy, writes chosen replies as update files, changes nothing
    client.py        train_locally: a ClientApp's local training with precode's model and defense stack
    defense_mods.py  defense_mod: noise, prune, clip (+noise) or ppp on a client's update, as a Flower mod
    truth.py         truth_mod: a simulation's truth files (the clients' real images), off unless enabled

See docs/federated.md for the threat model and a dozen-line example; examples/flower/ for a whole app.
"""

from __future__ import annotations

from precode_cli.errors import UserError

MIN_FLWR = (1, 21)  # the Message API: flwr.serverapp.strategy, flwr.app records, ClientApp mods on Messages


def _require_flwr() -> None:
    """Fail with one sentence, not an ImportError deep in a module, when Flower is missing or too old."""
    from importlib import metadata

    try:
        import flwr  # noqa: F401
        version = metadata.version("flwr")
    except (ImportError, metadata.PackageNotFoundError) as err:
        raise UserError('precode\'s Flower integration needs Flower; install "precode[flower]".') from err
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if numbers < MIN_FLWR:
        raise UserError(f'precode\'s Flower integration needs Flower >= {".".join(map(str, MIN_FLWR))} (its Message '
                        f'API), but {version} is installed; install "precode[flower]".')


_require_flwr()

from precode_cli.flower.client import train_locally  # noqa: E402
from precode_cli.flower.defense_mods import defense_mod  # noqa: E402
from precode_cli.flower.records import ConfigKeys, update_stem  # noqa: E402
from precode_cli.flower.recorder import RecordingStrategy  # noqa: E402
from precode_cli.flower.setup import Setup  # noqa: E402
from precode_cli.flower.truth import truth_mod  # noqa: E402

__all__ = ["ConfigKeys", "RecordingStrategy", "Setup", "defense_mod", "train_locally", "truth_mod", "update_stem"]
