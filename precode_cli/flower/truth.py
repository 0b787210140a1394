"""truth_mod: in a simulation, the real images behind each recorded update, so `precode evaluate` can score attacks.

A truth file holds a client's private examples, so the mod writes nothing unless it is created with
`enabled=True`; use it in simulations and audits only, never in a deployment. It lets the ClientApp
(and any inner mods) answer a train message, then writes `<out>/round-RRR-node-N.truth.safetensors`:
the examples the client trained on (the first `num_examples` of the recipe), their labels and their
positions, and `dump` naming the update the server records from the same reply. The client never
sees the server's file, so `dump.sha256` and `dump.content_sha256` are both
`fileformat.update_digest` of the weights it sent back, which evaluate matches against the update.

List it first in `ClientApp(mods=[...])` (the outermost mod), so it sees the reply the server gets,
after every defense mod.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, MessageType

from precode_cli import atomic, fileformat
from precode_cli.cli_support import now_iso, tool_info
from precode_cli.errors import UserError
from precode_cli.flower.defense_mods import Mod
from precode_cli.flower.records import ConfigKeys, arrays_of, config_of, recipe_from_config, to_tensors, update_stem
from precode_cli.flower.setup import Setup

# (images [n, C, H, W] in [0, 1], labels [n]) or (images, labels, positions [n] in the dataset) of a client
Examples = Callable[[Context], tuple[torch.Tensor, ...]]
SPLITS = ("train", "test", "all")


def truth_mod(out: Path | str, examples: Examples, setup: Setup, *, enabled: bool = False,
              keys: ConfigKeys = ConfigKeys(), rounds: Iterable[int] | None = None, split: str | None = None,
              arrayrecord_key: str | None = None, force: bool = False) -> Mod:
    """A mod writing the truth file of every train reply (of `rounds`, default all) into `out`, when `enabled`.

    examples(context): the client's examples in the order it trains on them, as the ClientApp loads them.
    split: the dataset split they come from, for the report. force: overwrite truth files of an earlier run.
    """
    if split is not None and split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, not {split!r}.")
    if not enabled:
        def passthrough(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
            return call_next(msg, context)
        return passthrough
    out = Path(out)
    chosen = None if rounds is None else {int(r) for r in rounds}
    names = setup.trainable_names()

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
            return reply
        config = config_of(msg)
        server_round = _round(msg, config, keys)
        if chosen is not None and server_round not in chosen:
            return reply
        returned = to_tensors(arrays_of(reply, arrayrecord_key)[1])
        missing = [n for n in names if n not in returned]
        if missing:
            raise UserError(f"truth_mod: the reply lacks the trained weights {missing[0]!r} of the setup's model.")
        digest = fileformat.update_digest({n: returned[n].float() for n in names})
        stem = update_stem(server_round, context.node_id)
        client_examples = tuple(examples(context))
        trained = recipe_from_config(config, len(client_examples[0]), keys).num_examples
        write_truth(out / f"{stem}.truth.safetensors", client_examples, setup, trained,
                    {"file": f"{stem}.safetensors", "sha256": digest, "content_sha256": digest},
                    {"split": split, "round": server_round, "node": str(context.node_id)}, force)
        return reply

    return mod


def write_truth(path: Path, client_examples: tuple[torch.Tensor, ...], setup: Setup, n: int, dump: dict[str, str],
                extra: dict[str, Any], force: bool = False) -> None:
    """Write one truth file: the first `n` examples of `client_examples`, naming `dump`."""
    images, labels = client_examples[0][:n].float(), client_examples[1][:n].long()
    positions = client_examples[2][:n].long() if len(client_examples) > 2 else torch.arange(n)
    if images.ndim != 4 or len(images) != n or len(labels) != n or len(positions) != n:
        raise UserError(f"truth_mod: examples(context) gave {len(images)} images and {len(labels)} labels for the "
                        f"{n} the client trained on.")
    first = int(positions[0])
    contiguous = torch.equal(positions, torch.arange(first, first + n))
    start = first if contiguous else 0
    meta = {
        "data": setup.batch_data(n), "dump": dump, "indices": [start, start + n],
        "pick": "first" if contiguous else "random", "tool": tool_info(), "created": now_iso(),
        "client_model": {"source": "flower", "epoch": max(extra["round"] - 1, 0), "test_accuracy": None},
        **{key: value for key, value in extra.items() if value is not None},
    }
    atomic.refuse_overwrite([path], force)
    fileformat.write(path, "truth", {"images": images, "labels": labels, "indices": positions}, meta)
    fileformat.read(path, "truth")  # what evaluate will read: one sentence now if it would not


def _round(msg: Message, config: dict[str, Any], keys: ConfigKeys) -> int:
    """The server round: the config's (FedAvg sends it), else the message's group id when it is a number."""
    value = config.get(keys.round)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    group = msg.metadata.group_id
    if group.isdigit():
        return int(group)
    raise UserError(f"truth_mod: the train config has no round {keys.round!r} to name the truth file by.")
