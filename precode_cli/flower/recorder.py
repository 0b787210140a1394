"""RecordingStrategy: what an honest-but-curious Flower server keeps of its clients' replies.

It wraps any Message-API strategy (FedAvg, FedProx, FedAdam, DP wrappers, ...). In
`configure_train` it notes, per chosen node, the global arrays and the config each message sends;
in `aggregate_train` it writes each chosen, error-free reply as a precode update file
(`<out>/round-RRR-node-N.safetensors`) and then hands the very same reply objects, in the same
order, to the wrapped strategy. It never edits a message, so the aggregate is the wrapped
strategy's, bit for bit. Evaluation and everything else go straight through.

The update records what the server knows (the global state it sent, the weights it got back, the
config it sent, the example count the client reported, and the round and node) and marks the rest of
the local recipe as assumed (`local.known`). The architecture comes from the `Setup` the server
built its model from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from precode_cli import atomic, fileformat
from precode_cli.cli_support import now_iso, tool_info
from precode_cli.errors import UserError
from precode_cli.flower.records import (
    ConfigKeys, arrays_of, config_of, metrics_of, num_examples, plain, recipe_from_config, to_tensors, update_stem,
)
from precode_cli.flower.setup import Setup
from precode_cli.outdir import OutputDir
from precode_cli.stages import profiles

Chooser = Callable[[int], bool]


class RecordingStrategy(Strategy):
    """Wrap `strategy`; record the train replies of the chosen `rounds` and `nodes` into `out` as update files.

    rounds, nodes: which to record (None: all); a set of ints or a predicate. `keys` says where the
    recipe is in the config and the reply's metrics; `assume` fills the recipe fields the server is
    not told (e.g. {"momentum": 0.9}). `strict` (default) stops the run on a reply that cannot be
    recorded; strict=False logs a warning and skips it. `force` overwrites update files of an
    earlier run in `out`.
    """

    def __init__(self, strategy: Strategy, out: Path | str, setup: Setup, *,
                 rounds: Iterable[int] | Chooser | None = None, nodes: Iterable[int] | Chooser | None = None,
                 keys: ConfigKeys = ConfigKeys(), assume: dict[str, Any] | None = None,
                 arrayrecord_key: str | None = None, strict: bool = True, force: bool = False) -> None:
        super().__init__()
        self.strategy = strategy
        self.out = Path(out)
        self.setup = setup
        self.keys = keys
        self.assume = dict(assume or {})
        self.arrayrecord_key = arrayrecord_key
        self.strict = strict
        self.force = force
        self.written: list[Path] = []
        self.skipped: list[tuple[int, int, str]] = []  # (round, node, why)
        self._rounds, self._nodes = _chooser(rounds), _chooser(nodes)
        self._sent: dict[int, dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]]] = {}
        self._out_dir: OutputDir | None = None
        self._params = setup.parameter_names()
        self._buffers = setup.buffer_names()
        self._trainable = setup.trainable_names()

    # ------------------------------------------------------------------ the Strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self._rounds(server_round):
            converted: dict[int, dict[str, torch.Tensor]] = {}  # FedAvg sends one record to every node
            sent = {}
            for message in messages:
                node = message.metadata.dst_node_id
                if not self._nodes(node) or not message.has_content():
                    continue
                record = self._arrays(message)
                if record is None:
                    continue
                if id(record) not in converted:
                    converted[id(record)] = to_tensors(record)
                sent[node] = (converted[id(record)], config_of(message))
            self._sent[server_round] = sent
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.pop(server_round, {})
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in sent and not reply.has_error():
                self._record(server_round, node, sent[node], reply)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├──> precode: recording train replies as update files into %s", self.out)
        self.strategy.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        """Strategy.start's rounds with this wrapper's hooks; the output folder is released at the end."""
        try:
            return super().start(grid, initial_arrays, *args, **kwargs)
        finally:
            self.close()

    def close(self) -> None:
        """Release the output folder's lock (taken at the first write)."""
        if self._out_dir is not None:
            self._out_dir.unlock()
            self._out_dir = None

    def __getattr__(self, name: str) -> Any:
        """The wrapped strategy's own attributes (e.g. FedAvg's weighted_by_key) read through the wrapper."""
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    # ------------------------------------------------------------------ recording
    def _arrays(self, message: Message) -> ArrayRecord | None:
        try:
            return arrays_of(message, self.arrayrecord_key)[1]
        except UserError as err:
            self._problem(-1, message.metadata.dst_node_id, str(err))
            return None

    def _record(self, server_round: int, node: int, sent: tuple[dict[str, torch.Tensor], dict[str, Any]],
                reply: Message) -> None:
        try:
            self._write(server_round, node, sent, reply)
        except UserError as err:
            self._problem(server_round, node, str(err))

    def _problem(self, server_round: int, node: int, why: str) -> None:
        if self.strict:
            raise UserError(f"precode cannot record node {node}'s reply in round {server_round}: {why}")
        log(WARNING, "precode: not recording node %s in round %s: %s", node, server_round, why)
        self.skipped.append((server_round, node, why))

    def _write(self, server_round: int, node: int, sent: tuple[dict[str, torch.Tensor], dict[str, Any]],
               reply: Message) -> None:
        global_arrays, config = sent
        returned_all = to_tensors(arrays_of(reply, self.arrayrecord_key)[1])
        metrics = metrics_of(reply)
        missing = [n for n in self._params + self._buffers if n not in global_arrays]
        if missing:
            raise UserError(f"the global arrays lack {missing[0]!r} of the model; send the whole state_dict "
                            "(ArrayRecord(model.state_dict())).")
        missing = [n for n in self._trainable if n not in returned_all]
        if missing:
            raise UserError(f"the reply lacks the trained weights {missing[0]!r}.")
        labels = self._labels(metrics)
        assume = {"labels_per_step": labels is not None, **self.assume}
        recipe = recipe_from_config(config, num_examples(metrics, self.keys), self.keys, assume)
        if labels is not None:
            labels = labels[:recipe.num_examples]
            if labels.numel() != recipe.num_examples:
                raise UserError(f"the reply's {self.keys.labels!r} holds {labels.numel()} labels for "
                                f"{recipe.num_examples} examples.")
        tensors = {f"param.{n}": global_arrays[n].float() for n in self._params}
        tensors.update({f"buffer.{n}": global_arrays[n] for n in self._buffers})
        returned = {n: returned_all[n].float() for n in self._trainable}
        tensors.update({f"returned.{n}": w for n, w in returned.items()})
        if labels is not None:
            tensors["labels"] = labels
        stack = self.setup.stack()
        meta = {
            "model": self.setup.model_spec, "defense": self.setup.defense_specs,
            "data": self.setup.batch_data(recipe.num_examples), "loss": stack.loss_spec(), "local": recipe.to_meta(),
            "capture": {
                "source": "flower", "round": int(server_round), "node": str(node),
                "epoch": max(int(server_round) - 1, 0), "mode": "train", "seed": 0,
                "labels_shared": labels is not None, "tool": tool_info(), "time": now_iso(),
                "options": {"strategy": type(self.strategy).__name__, "config": plain(config),
                            "metrics": plain({k: v for k, v in metrics.items() if k != self.keys.labels}),
                            "content_sha256": fileformat.update_digest(returned)},
            },
        }
        path = self.out / f"{update_stem(server_round, node)}.safetensors"
        self._lock()
        atomic.refuse_overwrite([path], self.force)
        fileformat.write(path, "update", tensors, meta)
        try:  # what precode attack will read: validate it now, not after the run
            fileformat.read(path, "update", profile=profiles.for_files(self.setup.trusted_builder))
        except UserError:
            path.unlink(missing_ok=True)
            raise
        self.written.append(path)

    def _labels(self, metrics: dict[str, Any]) -> torch.Tensor | None:
        if self.keys.labels is None or self.keys.labels not in metrics:
            return None
        value = metrics[self.keys.labels]
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise UserError(f"the reply's {self.keys.labels!r} is not a list of integer labels.")
        return torch.tensor(values, dtype=torch.int64)

    def _lock(self) -> None:
        if self._out_dir is None:
            out_dir = OutputDir(self.out).__enter__()
            out_dir.lock()
            self._out_dir = out_dir


def _chooser(choice: Iterable[int] | Chooser | None) -> Chooser:
    if choice is None:
        return lambda _: True
    if callable(choice):
        return choice
    chosen = {int(c) for c in choice}
    return lambda value: value in chosen
