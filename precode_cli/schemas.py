"""The declared schema of every precode file kind's metadata, checked once when a file is read.

A file travels between parties, so its metadata is validated here, up front, before any tensor is
loaded or any model is built: every field's type, range and allowed values, and the rules that tie
fields together (labels of shape [batch_size], mean and std with one entry per channel, a resume
step within the run's iterations). Code after `fileformat.read` may then trust the metadata's shape.

The classes below are the format's documentation too: tests/test_docs.py checks that every field
declared here is described in docs/file-format.md. Unknown keys are allowed (readers must ignore
keys they do not know) but bounded in size and depth by `fileformat`.

Pydantic v2 does the checking: it is the maintained, widely used declaration library for Python,
its strict mode refuses the silent conversions a hostile file would exploit (true for 1, "3" for
3), and its errors carry the failing field's path for a one-sentence message.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["SCHEMAS", "ValidationError", "first_error", "json_depth"]

from precode_cli.limits import (  # noqa: F401 - re-exported: the schemas' ranges
    MAX_BATCH, MAX_CHANNELS, MAX_CLASSES, MAX_DEFENSES, MAX_EPOCHS, MAX_GROUP, MAX_IMPRINT_BINS, MAX_ITERATIONS,
    MAX_JSON_DEPTH, MAX_K,
    MAX_LOCAL_STEPS, MAX_RESTARTS, MAX_SEED, MAX_SIDE, MAX_WIDTH,
)
TEXT = 4096  # longest path or free text
NAME = 255  # longest file or module name
SHA256 = r"^[0-9a-f]{64}$"

Finite = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters: what a file names may reach a one-line message
Text = Annotated[str, Field(max_length=TEXT, pattern=PRINTABLE)]
Name = Annotated[str, Field(min_length=1, max_length=NAME, pattern=PRINTABLE)]
Short = Annotated[str, Field(max_length=200, pattern=PRINTABLE)]
FILE_NAME = r"^[^/\\\x00-\x1f\x7f]+$"  # a plain file name: no folder, no control characters
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Shape3 = Annotated[list[Side], Field(min_length=3, max_length=3)]


class Declared(BaseModel):
    """Strict types (no silent conversions); unknown keys allowed, as the format says."""

    model_config = ConfigDict(strict=True, extra="allow")


class Closed(Declared):
    """A structure whose keys are all known: an unknown key is a mistake, not a newer writer."""

    model_config = ConfigDict(strict=True, extra="forbid")


# ---------------------------------------------------------------------------------------- shared


class Tool(Declared):
    """`tool`: the versions that wrote the file."""

    precode: Annotated[str, Field(max_length=64, pattern=PRINTABLE)]
    torch: Annotated[str, Field(max_length=64, pattern=PRINTABLE)]
    python: Annotated[str, Field(max_length=64, pattern=PRINTABLE)]


class ModelKwargs(Closed):
    """A built-in builder's options (`width` or `norm`); which builder takes which is checked too."""

    width: Optional[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = None
    norm: Optional[Literal["batch", "group"]] = None


class ImprintSpec(Closed):
    """`model.imprint`: the binning module a malicious server put in front of the model (`capture-gradients
    --threat imprint`, precode_cli/models/imprint.py): `bins` Linear rows that all measure along one
    direction (`measurement`: the mean of the normalised pixels, or a random unit direction drawn from
    `seed`), offset by standard-normal quantiles, and a Linear back to the input's shape. Its parameters
    are `imprint.bins.*` and `imprint.back.*`."""

    bins: Annotated[int, Field(ge=2, le=MAX_IMPRINT_BINS)]
    measurement: Literal["mean", "random"]
    seed: Seed


class ModelSpec(Declared):
    """`model`: enough to rebuild the undefended architecture. Rules: `name` is a built-in architecture
    (mlp, cnn, lenet, convnet, resnet18) or `package.module:builder`; `kwargs` holds only the options that
    architecture takes (`width`: mlp, cnn, convnet; `norm`: resnet18), none for a user's builder; at most
    4 channels; `imprint` only in files a capture wrote (never in a trained model)."""

    name: Name
    kwargs: ModelKwargs = Field(default_factory=ModelKwargs)
    input_shape: Shape3
    num_classes: Annotated[int, Field(ge=1, le=MAX_CLASSES)]
    imprint: Optional[ImprintSpec] = None

    @model_validator(mode="after")
    def _known_builder(self) -> "ModelSpec":
        from precode_cli import models

        if models.is_user_builder(self.name):
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.name):
                raise ValueError("a user's builder must be named package.module:builder")
            if self.kwargs.model_fields_set:
                raise ValueError("a user's builder takes no kwargs")
            return self
        if self.name not in models.BUILDERS:
            raise ValueError(f"unknown architecture {_clip(self.name)}; this precode knows {', '.join(models.BUILDERS)}")
        for key in self.kwargs.model_fields_set:
            if getattr(self.kwargs, key) is not None and key not in models.OPTIONS[self.name]:
                raise ValueError(f"{self.name} takes no option {key}")
        if self.input_shape[0] > MAX_CHANNELS:
            raise ValueError(f"input_shape has {self.input_shape[0]} channels; at most {MAX_CHANNELS}")
        return self


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
ModuleName = Optional[Name]


class PrecodeParams(Closed):
    k: Annotated[int, Field(ge=1, le=MAX_K)]
    beta: NonNegative
    at: ModuleName = None


class NoiseParams(Closed):
    scale: Positive
    distribution: Literal["gaussian", "laplace"]


class PruneParams(Closed):
    keep: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class DPParams(Closed):
    clip: Positive
    sigma: Positive
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class SoteriaParams(Closed):
    percent: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
    layer: ModuleName = None
    rule: Literal["count", "gs"] = "count"  # files of earlier builds have none: they used `count`


class PPPParams(PrecodeParams):
    clip: Positive
    sigma: NonNegative
    params: Optional[Annotated[list[Name], Field(max_length=10_000)]] = None


class CVBParams(Closed):
    channels: Optional[Annotated[int, Field(ge=1, le=MAX_K)]] = None
    beta: NonNegative
    at: ModuleName = None
    kl: Literal["gaussian", "authors"] = "gaussian"  # files of earlier builds have none: they used "gaussian"


class _Defense(Closed):
    pass


class PrecodeEntry(_Defense):
    name: Literal["precode"]
    params: PrecodeParams


class NoiseEntry(_Defense):
    name: Literal["noise"]
    params: NoiseParams


class PruneEntry(_Defense):
    name: Literal["prune"]
    params: PruneParams


class DPEntry(_Defense):
    name: Literal["dp"]
    params: DPParams


class SoteriaEntry(_Defense):
    name: Literal["soteria"]
    params: SoteriaParams


class PPPEntry(_Defense):
    name: Literal["ppp"]
    params: PPPParams


class CVBEntry(_Defense):
    name: Literal["cvb"]
    params: CVBParams


DefenseEntry = Annotated[
    Union[PrecodeEntry, NoiseEntry, PruneEntry, DPEntry, SoteriaEntry, PPPEntry, CVBEntry], Field(discriminator="name")
]
DefenseList = Annotated[list[DefenseEntry], Field(max_length=MAX_DEFENSES)]


def _check_defenses(entries: list[Any]) -> None:
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError("a defense is listed twice")
    if "precode" in names and "ppp" in names:
        raise ValueError("precode and ppp cannot be combined")
    if "dp" in names and "soteria" in names:
        raise ValueError("dp and soteria cannot be combined")


class DataSpec(Declared):
    """`data`: where the images came from and how they become model inputs. Rules: `mean` and `std` have
    one entry per channel of `input_shape`; `class_names`, when given, has `num_classes` names."""

    dataset: Literal["builtin", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "tensors"]
    data_dir: Optional[Text] = None
    image_size: Optional[Annotated[int, Field(ge=8, le=512)]] = None
    channels: Optional[Literal[1, 3]] = None
    mean: Annotated[list[Annotated[float, Field(ge=-1e3, le=1e3, allow_inf_nan=False)]], Field(min_length=1, max_length=MAX_CHANNELS)]
    std: Annotated[list[Annotated[float, Field(ge=1e-6, le=1e3, allow_inf_nan=False)]], Field(min_length=1, max_length=MAX_CHANNELS)]
    stats: Optional[Short] = None
    input_shape: Shape3
    num_classes: Annotated[int, Field(ge=1, le=MAX_CLASSES)]
    class_names: Annotated[list[Short], Field(max_length=MAX_CLASSES)] = Field(
        default_factory=list)
    batch_size: Optional[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = None

    @model_validator(mode="after")
    def _consistent(self) -> "DataSpec":
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need one entry per channel ({channels}), not {len(self.mean)} and "
                             f"{len(self.std)}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        return self


class BatchedData(DataSpec):
    """`data` of a file about one batch: `batch_size` is required."""

    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)]


def _same_model_and_data(model: ModelSpec, data: DataSpec) -> None:
    if list(model.input_shape) != list(data.input_shape):
        raise ValueError(f"model.input_shape {model.input_shape} differs from data.input_shape {data.input_shape}")
    if model.num_classes != data.num_classes:
        raise ValueError(f"model.num_classes {model.num_classes} differs from data.num_classes {data.num_classes}")


class FileRef(Closed):
    """`{"file", "sha256"}`: a dump by its plain file name and the hash of its bytes."""

    file: Annotated[str, Field(min_length=1, max_length=NAME, pattern=FILE_NAME)]
    sha256: Annotated[str, Field(pattern=SHA256)]
    content_sha256: Optional[Annotated[str, Field(pattern=SHA256)]] = None  # an update's `fileformat.update_digest`

    @model_validator(mode="after")
    def _plain_name(self) -> "FileRef":
        if self.file in (".", ".."):
            raise ValueError("file must be a plain file name")
        return self


Options = Annotated[dict[str, Any], Field(max_length=500)]
Scalar = Union[bool, int, Finite, Annotated[str, Field(max_length=TEXT)], None]


# ------------------------------------------------------------------------------- model, training


class TrainRecord(Declared):
    """A model file's `train`: how it was trained and how far."""

    epoch: Optional[Annotated[int, Field(ge=0, le=MAX_EPOCHS)]] = None
    epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
    batch_size: Optional[Annotated[int, Field(ge=1)]] = None
    optimizer: Optional[Literal["adam", "sgd"]] = None
    lr: Optional[Finite] = None
    momentum: Optional[Finite] = None
    weight_decay: Optional[Finite] = None
    seed: Optional[Seed] = None
    subset: Optional[Annotated[int, Field(ge=1)]] = None
    test_accuracy: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None
    privacy: Optional[dict[str, Scalar]] = None
    created: Optional[Text] = None

    @model_validator(mode="after")
    def _epoch_exists(self) -> "TrainRecord":
        if self.epoch is not None and self.epoch > self.epochs:
            raise ValueError(f"epoch {self.epoch} is beyond the run's {self.epochs} epochs")
        return self


class ModelFile(Declared):
    """Metadata of `precode-model`. Rules: `model.input_shape` and `model.num_classes` equal `data`'s; a
    defense is listed at most once, and precode+ppp and dp+soteria are not combined; `train.epoch` is at
    most `train.epochs`. Tensors: exactly the state dict of the model that `model` and `defense` describe,
    with its shapes (parameters F32, buffers in their own dtype)."""

    model: ModelSpec
    defense: DefenseList
    data: DataSpec
    train: TrainRecord
    tool: Tool

    @model_validator(mode="after")
    def _consistent(self) -> "ModelFile":
        _check_defenses(self.defense)
        _same_model_and_data(self.model, self.data)
        _no_imprint(self.model)
        return self


class HistoryRow(Declared):
    """One epoch of a training history."""

    epoch: Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
    train_loss: Finite
    train_accuracy: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    test_loss: Finite
    test_accuracy: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class TrainState(Declared):
    """A training state's `train`: epochs finished, their history, the device, the run's options."""

    epoch: Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
    history: Annotated[list[HistoryRow], Field(max_length=MAX_EPOCHS)]
    device: Literal["cpu", "cuda", "mps"]
    options: Options

    @model_validator(mode="after")
    def _history_matches(self) -> "TrainState":
        if len(self.history) != self.epoch:
            raise ValueError(f"history has {len(self.history)} epochs but epoch says {self.epoch}")
        if [row.epoch for row in self.history] != list(range(1, self.epoch + 1)):
            raise ValueError("history's epochs are not 1, 2, ... in order")
        epochs = self.options.get("epochs")
        if isinstance(epochs, int) and not isinstance(epochs, bool) and self.epoch > epochs:
            raise ValueError(f"epoch {self.epoch} is beyond the run's {epochs} epochs")
        return self


class TrainingStateFile(Declared):
    """Metadata of `precode-training-state`. Rules: as for a model file; `train.history` has one row per
    finished epoch (`train.epoch` rows, numbered 1, 2, ...), and `train.epoch` is at most the run's
    `--epochs`. Tensors: `model.*` as a model file's; `optimizer.<i>.<slot>` with the slots of the run's
    optimiser and parameter i's shape; `rng.shuffle` and `rng.torch` U8 [5056]."""

    model: ModelSpec
    defense: DefenseList
    data: DataSpec
    train: TrainState
    tool: Tool

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingStateFile":
        _check_defenses(self.defense)
        _same_model_and_data(self.model, self.data)
        _no_imprint(self.model)
        return self


def _no_imprint(model: ModelSpec) -> None:
    if model.imprint is not None:
        raise ValueError("model.imprint is a malicious server's module added at capture, never part of a trained model")


# ------------------------------------------------------------------------------- gradients, truth


class LossSpec(Closed):
    """`loss`: how the shared gradient's loss was computed."""

    name: Literal["cross_entropy"]
    reduction: Literal["mean"]
    includes_vb_kl: bool


class ClientModel(Declared):
    """`client_model` of a truth file: the model the client used, as capture saw it."""

    source: Literal["run", "untrained", "flower"]
    epoch: Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
    test_accuracy: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None

    @model_validator(mode="after")
    def _source(self) -> "ClientModel":
        if self.source == "untrained" and (self.epoch != 0 or self.test_accuracy is not None):
            raise ValueError("an untrained model has epoch 0 and no test accuracy")
        return self


class CaptureRecord(Declared):
    """A dump's `capture`: where the weights came from and how the gradient was computed."""

    source: Literal["run", "untrained"]
    run: Optional[Text] = None
    epoch: Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
    mode: Literal["train", "eval"] = "train"
    seed: Seed
    labels_shared: bool
    threat: Literal["honest", "imprint"] = "honest"  # imprint: the server put an imprint module in front (model.imprint)
    test_accuracy: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None
    options: Options = Field(default_factory=dict)
    tool: Optional[Tool] = None
    time: Optional[Text] = None

    @model_validator(mode="after")
    def _source(self) -> "CaptureRecord":
        if self.source == "untrained" and self.epoch != 0:
            raise ValueError("an untrained model has epoch 0")
        return self


class StateRef(Closed):
    """A version-2 dump's `state`: the shared model state it was computed on, by content hash. The reader
    loads GRADS_DIR/states/<sha256>.safetensors beside the dump, and only that file."""

    sha256: Annotated[str, Field(pattern=SHA256)]


class BatchNormStats(Closed):
    """A dump's `bn_stats` (`capture-gradients --record-bn-stats`): the batch mean and variance of every
    listed BatchNorm layer's input in the client's forward pass, which the client's update of the running
    statistics reveals (precode_cli/bn_stats.py). Rules: `layers` are distinct, and each is a BatchNorm
    layer of the described model (it has `running_mean` and `running_var`). Tensors: `bn_stats.<layer>.mean`
    and `bn_stats.<layer>.var` F32 [channels] for each layer, the variance biased (the one the layer
    normalised with)."""

    revealed_by: Literal["client BatchNorm update"]
    variance: Literal["biased"]
    layers: Annotated[list[Name], Field(min_length=1, max_length=10_000)]

    @model_validator(mode="after")
    def _distinct(self) -> "BatchNormStats":
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("a layer is listed twice")
        return self


class GradientsFile(Declared):
    """Metadata of `precode-gradients`. Rules: model and data agree as in a model file;
    `loss.includes_vb_kl` is true exactly when the defense list has precode, ppp or cvb; an untrained source
    has epoch 0; `bn_stats` only with `capture.mode` train; `capture.threat` is imprint exactly when
    `model.imprint` describes the module. Tensors: `grad.*` and `param.*` (F32) for every
    trainable parameter and `buffer.*` for every buffer, with the shapes of the described model; `labels`
    I64 [batch_size] with values in 0..num_classes-1, present exactly when `capture.labels_shared`;
    `bn_stats.*` exactly when `bn_stats` lists them. Version 2: with `state`, `param.*`
    and `buffer.*` live in the shared state file instead; a 2-D weight's gradient may be stored as
    `factor.<name>.left` [batch_size, out] and `factor.<name>.right` [batch_size, in] instead of
    `grad.<name>`."""

    model: ModelSpec
    defense: DefenseList
    data: BatchedData
    loss: LossSpec
    capture: CaptureRecord
    state: Optional[StateRef] = None
    bn_stats: Optional[BatchNormStats] = None

    @model_validator(mode="after")
    def _consistent(self) -> "GradientsFile":
        _check_client_file(self)
        if self.bn_stats is not None and self.capture.mode != "train":
            raise ValueError("bn_stats are recorded in train mode only, but capture.mode is eval")
        return self


def _check_client_file(meta: Any) -> None:
    """What a dump and an update share: defenses, model and data agreeing, the loss matching the defenses."""
    _check_defenses(meta.defense)
    _same_model_and_data(meta.model, meta.data)
    with_vb = any(entry.name in ("precode", "ppp", "cvb") for entry in meta.defense)
    if meta.loss.includes_vb_kl != with_vb:
        raise ValueError("loss.includes_vb_kl disagrees with the defense list")
    if (meta.capture.threat == "imprint") != (meta.model.imprint is not None):
        raise ValueError("capture.threat is imprint exactly when model.imprint describes the module")


class LocalRecord(Closed):
    """An update's `local`: the client's local training recipe (precode_cli/local_training.py).
    `known` lists the fields the server knows; the attacker assumes the others."""

    optimizer: Literal["sgd"]
    lr: Annotated[float, Field(ge=1e-12, le=1e6, allow_inf_nan=False)]  # the attack divides by it
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    weight_decay: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
    steps: Annotated[int, Field(ge=1, le=MAX_LOCAL_STEPS)]
    epochs: Optional[Annotated[int, Field(ge=1, le=MAX_LOCAL_STEPS)]] = None
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)]
    num_examples: Annotated[int, Field(ge=1, le=MAX_BATCH)]
    shuffle: bool
    labels_per_step: bool
    known: Annotated[list[Literal["optimizer", "lr", "momentum", "weight_decay", "steps", "epochs", "batch_size",
                                  "num_examples", "shuffle", "labels_per_step"]], Field(max_length=10)]

    @model_validator(mode="after")
    def _consistent(self) -> "LocalRecord":
        batches = -(-self.num_examples // self.batch_size)
        if self.batch_size > self.num_examples:
            raise ValueError("batch_size is larger than num_examples")
        if self.steps < batches:
            raise ValueError(f"{self.steps} steps do not reach all {self.num_examples} examples")
        if self.epochs is not None and self.steps != self.epochs * batches:
            raise ValueError(f"{self.epochs} epochs are not {self.steps} steps")
        return self


class UpdateCapture(CaptureRecord):
    """An update's `capture`: as a dump's, and for updates recorded from Flower (`source: flower`) the
    server round and the replying node."""

    source: Literal["run", "untrained", "flower"]
    round: Optional[Annotated[int, Field(ge=0, le=2**31)]] = None
    node: Optional[Short] = None


class UpdateFile(Declared):
    """Metadata of `precode-update`, what a FedAvg client sends back. Rules: as a gradient dump's, and
    `local.num_examples` equals `data.batch_size` (the client's examples are the batch). Tensors:
    `param.*` (F32) and `buffer.*`, the global state the server sent; `returned.*` (F32), the weights
    the client sent back, for every trainable parameter; `labels` I64 [batch_size], present exactly
    when `capture.labels_shared`. Version 2: with `state`, `param.*` and `buffer.*` live in the shared
    state file instead."""

    model: ModelSpec
    defense: DefenseList
    data: BatchedData
    loss: LossSpec
    local: LocalRecord
    capture: UpdateCapture
    state: Optional[StateRef] = None

    @model_validator(mode="after")
    def _consistent(self) -> "UpdateFile":
        _check_client_file(self)
        if self.local.num_examples != self.data.batch_size:
            raise ValueError("local.num_examples differs from data.batch_size")
        return self


class TruthFile(Declared):
    """Metadata of `precode-truth`. Rules: `indices` [start, stop] spans `data.batch_size` images;
    `dump.file` is a plain file name (no folder). Tensors: `images` F32 [B, C, H, W] in [0, 1] with
    `data.input_shape`; `labels` I64 [B] within the classes; `indices` I64 [B], the victims' positions
    in the split: equal to start..stop-1 when `pick` is `first` or absent, distinct and non-negative
    when `pick` is `random` (positions start..stop-1 of the split shuffled by `seed`)."""

    data: BatchedData
    dump: FileRef
    indices: Annotated[list[Annotated[int, Field(ge=0, le=2**53)]], Field(min_length=2, max_length=2)]
    tool: Tool
    pick: Optional[Literal["first", "random"]] = None
    split: Optional[Literal["train", "test", "all"]] = None
    seed: Optional[Seed] = None
    client_model: Optional[ClientModel] = None
    created: Optional[Text] = None

    @model_validator(mode="after")
    def _consistent(self) -> "TruthFile":
        start, stop = self.indices
        if stop - start != self.data.batch_size:
            raise ValueError(f"indices {self.indices} do not span batch_size {self.data.batch_size} images")
        return self


# ------------------------------------------------------------------------------ attack outputs

Method = Literal["ig", "ig-adaptive", "ig-noise", "ig-bn", "dlg", "idlg", "analytic", "imprint"]


class AttackParams(Declared):
    """`attack.params`: the method's settings; the bounded ones are declared."""

    iterations: Optional[Annotated[int, Field(ge=1, le=MAX_ITERATIONS)]] = None
    restarts: Optional[Annotated[int, Field(ge=1, le=MAX_RESTARTS)]] = None
    lr: Optional[Finite] = None
    tv_weight: Optional[Finite] = None
    init: Optional[Literal["randn", "rand", "zeros"]] = None
    ignore_layers: Optional[Annotated[list[Name], Field(max_length=1000)]] = None
    patience: Optional[Annotated[int, Field(ge=0, le=MAX_ITERATIONS)]] = None
    min_improvement: Optional[Annotated[float, Field(ge=0, lt=1)]] = None
    bn_weight: Optional[Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]] = None


class AttackRecord(Declared):
    """A reconstruction's `attack`."""

    name: Method
    params: AttackParams
    seed: Seed
    label_source: Literal["dump", "recovered", "optimized"]
    seconds: Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = None
    completed: bool = True
    iterations_done: Optional[Annotated[int, Field(ge=0, le=MAX_ITERATIONS)]] = None
    note: Optional[Text] = None
    stopped_at: Optional[Annotated[int, Field(ge=0, le=MAX_ITERATIONS)]] = None
    threads: Optional[Annotated[int, Field(ge=1, le=1024)]] = None
    # who the attacker was: a server that only reads what the client shares, or one that changed the model it sent
    threat_model: Optional[Literal["honest-but-curious", "malicious-server"]] = None


class ReconstructionFile(Declared):
    """Metadata of `precode-reconstruction`. Rules: model and data agree; `source.file` is a plain file
    name. Tensors: `images` F32 [B, C, H, W] in [0, 1]; `labels` I64 [B] within the classes;
    `loss_trace` F32 [attack.iterations_done]."""

    attack: AttackRecord
    source: FileRef
    model: ModelSpec
    defense: DefenseList
    data: BatchedData
    tool: Tool
    created: Optional[Text] = None

    @model_validator(mode="after")
    def _consistent(self) -> "ReconstructionFile":
        _check_defenses(self.defense)
        _same_model_and_data(self.model, self.data)
        return self


class AttackSettings(Declared):
    """An attack state's `attack`: the settings it continues."""

    name: Method
    params: AttackParams


class AttackStateFile(Declared):
    """Metadata of `precode-attack-state`. Rules: `step` is at most `attack.params.iterations`; no dump is
    named twice in `sources`. Tensors: `inputs` F32 [R, B, C, H, W], `traces` F32 [R, n] with
    step <= n <= iterations, `noise.*`, `adam.<i>.<slot>` (with `adam.<i>.step` equal to `step`), `rng` U8
    [5056], `rng.replay.<r>`, `stopped` I64 [R] (the iteration each row stopped early at, -1 if running), `skipped` I64 [R] (steps
    skipped for a non-finite loss);
    `attack --resume` checks every shape against the dumps it continues."""

    attack: AttackSettings
    sources: Annotated[list[FileRef], Field(min_length=1, max_length=MAX_GROUP)]
    step: Annotated[int, Field(ge=0, le=MAX_ITERATIONS)]
    seed: Seed
    tool: Tool
    created: Optional[Text] = None

    @model_validator(mode="after")
    def _consistent(self) -> "AttackStateFile":
        iterations = self.attack.params.iterations
        if iterations is not None and self.step > iterations:
            raise ValueError(f"step {self.step} is beyond the attack's {iterations} iterations")
        names = [source.file for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError("sources names a dump twice")
        return self


class StateContent(Closed):
    """A state's `content`: the SHA-256 of its tensors (`precode_cli.states.content_digest`), also its name."""

    sha256: Annotated[str, Field(pattern=SHA256)]


class StateFile(Declared):
    """Metadata of `precode-state` (version 2 only): a model state that many dumps share, stored once as
    GRADS_DIR/states/<content.sha256>.safetensors. Tensors: `param.*` (F32) and `buffer.*`, checked
    against the model of each dump that names it; they must hash to `content.sha256`."""

    content: StateContent
    tool: Tool


SCHEMAS: dict[str, type[Declared]] = {
    "model": ModelFile,
    "training-state": TrainingStateFile,
    "gradients": GradientsFile,
    "update": UpdateFile,
    "truth": TruthFile,
    "reconstruction": ReconstructionFile,
    "attack-state": AttackStateFile,
    "state": StateFile,
}


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a decoded JSON value, counting no further than `limit + 1` (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def first_error(err: ValidationError) -> str:
    """The first problem of a failed validation as a short phrase: "data.mean: ..." (values not echoed)."""
    problem = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in problem["loc"] if not _is_union_tag(part))
    message = problem["msg"]
    if problem["type"] == "union_tag_invalid":  # an unknown defense name
        message = (f"unknown defense {_clip(str(problem['ctx']['tag']))}; this precode knows "
                   f"{problem['ctx']['expected_tags'].replace(chr(39), '')}")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    message = message.rstrip(".")
    text = f"{where}: {message}" if where else message
    return text if len(text) <= 200 else text[:197] + "..."


def _clip(text: str, limit: int = 40) -> str:
    """`repr(text)`, shortened: a hostile file's values must not flood a one-line message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts the chosen union member's tag in a location; it is noise for a reader."""
    return isinstance(part, str) and (part in ("precode", "noise", "prune", "dp", "soteria", "ppp", "cvb")
                                      or part.startswith("function-"))
