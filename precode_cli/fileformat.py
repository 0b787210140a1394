"""The precode file format, versions 1 and 2: safetensors tensors plus JSON metadata, never pickle.

Eight kinds of file connect the stages (see docs/file-format.md for the full specification):

    model            precode train              weights of a trained model (also every epoch checkpoint)
    training-state   precode train              what `--resume` needs: weights, optimiser, random state
    gradients        precode capture-gradients  what one client shares for one batch (attacker's view)
    update           capture-gradients --local-steps, or precode's Flower recorder: a FedAvg client's reply
    truth            precode capture-gradients  the batch's real images and labels (evaluation only)
    reconstruction   precode attack             what an attack recovered from one gradient dump
    attack-state     precode attack             what `--resume` needs to continue an interrupted attack
    state            precode capture-gradients  a model state many dumps share (GRADS_DIR/states/<sha256>)

Every file carries the metadata keys `format` (e.g. "precode-gradients") and `format_version`
("1", or "2" for gradients, updates and states) as plain strings; every other metadata value is a JSON document. Readers check format and
version before they look at anything else, and refuse what they do not understand.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from precode_cli import bn_stats, budget, factors, schemas, states
from precode_cli.atomic import atomic_path
from precode_cli.errors import UserError

FORMAT_VERSION = 2  # the newest version of any kind; `VERSIONS` says which each kind is written in
FORMAT_NAMES = {
    "model": "precode-model",
    "training-state": "precode-training-state",
    "gradients": "precode-gradients",
    "update": "precode-update",
    "truth": "precode-truth",
    "reconstruction": "precode-reconstruction",
    "attack-state": "precode-attack-state",
    "state": "precode-state",
}
# The version each kind is written in; a reader takes any version from 1 (2 for a state) up to it.
# Version 2 of gradients and updates may keep the model state in a shared `state` file (`state` metadata)
# and a Linear weight gradient as its factors (`factor.*`); version 1 keeps everything in the dump.
VERSIONS = {kind: 1 for kind in FORMAT_NAMES} | {"gradients": 2, "update": 2, "state": 2}
OLDEST = {kind: 1 for kind in FORMAT_NAMES} | {"state": 2}
SHARED_STATE_KINDS = ("gradients", "update")
DESCRIPTIONS = {
    "model": "a model file (model.safetensors or checkpoints/epoch-N.safetensors from `precode train`)",
    "training-state": "a training state (checkpoints/resume.safetensors from `precode train`)",
    "gradients": "a gradient dump (from `precode capture-gradients`)",
    "update": "a client update (from `precode capture-gradients --local-steps` or precode's Flower recorder)",
    "truth": "a truth file (<id>.truth.safetensors from `precode capture-gradients`)",
    "reconstruction": "a reconstruction (from `precode attack`)",
    "attack-state": "an attack checkpoint (RECON_DIR/checkpoints/*.safetensors from `precode attack`)",
    "state": "a shared model state (GRADS_DIR/states/<sha256>.safetensors from `precode capture-gradients`)",
}
# JSON metadata keys each kind must carry, besides `format` and `format_version`.
REQUIRED_METADATA = {
    "model": ("model", "defense", "data", "train", "tool"),
    "training-state": ("model", "defense", "data", "train", "tool"),
    "gradients": ("model", "defense", "data", "loss", "capture"),
    "update": ("model", "defense", "data", "loss", "local", "capture"),
    "truth": ("data", "dump", "indices", "tool"),
    "reconstruction": ("attack", "source", "model", "defense", "data", "tool"),
    "attack-state": ("attack", "sources", "step", "seed", "tool"),
    "state": ("content", "tool"),
}
MAX_METADATA_BYTES = 1_000_000
# What to do about a file whose numbers are not all finite, by kind.
REDO = {
    "model": "train the model again (a smaller --lr often helps)",
    "training-state": "train again from the start without --resume",
    "gradients": "capture the gradients again from a model whose loss is finite",
    "update": "capture the update again from a model whose loss is finite",
    "truth": "capture the gradients again",
    "reconstruction": "attack the dump again",
    "attack-state": "start the attack over with --force",
    "state": "capture the gradients again",
}


@dataclass
class StoredFile:
    """Tensors and decoded metadata of one precode file."""

    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with `prefix.`, keyed by the rest of the name."""
        start = len(prefix) + 1
        return {name[start:]: t for name, t in self.tensors.items() if name.startswith(prefix + ".")}


def write(path: Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
          version: int | None = None) -> None:
    """Write a precode file atomically: a crash leaves either the old file or the whole new one.

    `version` (default: the kind's newest) exists so tests can write the older layouts readers still take.
    """
    if kind not in FORMAT_NAMES:
        raise ValueError(f"unknown file kind {kind!r}")
    metadata = {"format": FORMAT_NAMES[kind], "format_version": str(version or VERSIONS[kind])}
    metadata.update({key: json.dumps(value, sort_keys=True) for key, value in meta.items()})
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(plain, str(tmp), metadata=metadata)


def read(path: Path, kind: str, *, profile: ProfileFn | None = None) -> StoredFile:
    """Read and validate a precode file of the given kind; every problem is one `UserError` sentence.

    The checks run in the order of docs/file-format.md#validation-rules: the container and its
    kind and version, the metadata against the kind's declared schema (`schemas.SCHEMAS`), the
    tensor table (names, dtypes, shapes) against what that metadata declares, the memory budget,
    and only then the tensors' data. `profile` measures the model a file's metadata describes
    (the stages pass `precode_cli.stages.profiles.for_files(--model)`); without it, the tensors of a
    model file, training state or dump are checked by name and dtype but not by shape.
    """
    path = Path(path)
    raw_meta = read_raw_metadata(path, kind)
    meta = _decode_metadata(path, kind, raw_meta)
    version = int(raw_meta["format_version"])
    table = tensor_table(path, kind)
    model = _check_tensor_table(path, kind, meta, table, profile, version)
    nbytes = _table_bytes(table) + _rebuilt_bytes(table)
    shared = _shared_state(path, kind, meta, version, model)
    if shared is not None:
        nbytes += _table_bytes(shared[1])
    budget.require(f"reading {path}" + (f" and its model state {shared[0].name}" if shared else ""), nbytes)
    tensors = _load_tensors(path, kind)
    _check_values(path, kind, meta, tensors)
    if shared is not None:
        tensors.update(_load_state(shared[0], meta["state"]["sha256"]))
    if version >= 2 and kind == "gradients":
        tensors = factors.rebuild_all(tensors)
    return StoredFile(kind=kind, tensors=tensors, meta=meta)


def _table_bytes(table: dict[str, tuple[str, list[int]]]) -> int:
    return sum(math.prod(shape) * _ITEMSIZE.get(dtype, 8) for dtype, shape in table.values())


def _rebuilt_bytes(table: dict[str, tuple[str, list[int]]]) -> int:
    """The matrices that factored gradients become (their declared shapes were checked already)."""
    total = 0
    for name, (_, shape) in table.items():
        if name.startswith(factors.PREFIX) and name.endswith("." + factors.LEFT):
            right = table.get(name[: -len(factors.LEFT)] + factors.RIGHT)
            if right is not None and len(shape) == 2 and len(right[1]) == 2:
                total += 4 * shape[1] * right[1][1]
    return total


def _shared_state(path: Path, kind: str, meta: dict[str, Any], version: int,
                  model: budget.ModelProfile | None) -> tuple[Path, dict[str, tuple[str, list[int]]]] | None:
    """The shared state file a version-2 dump names, with its checked tensor table; None if the dump holds its own."""
    if kind not in SHARED_STATE_KINDS or version < 2 or meta.get("state") is None:
        return None
    state = states.state_path(path, meta["state"]["sha256"])
    read_raw_metadata(state, "state")
    table = tensor_table(state, "state")
    expected = _state_rules(model)
    _check_table(state, "state", expected, table, required=[n for n in expected if not n.endswith("*")])
    return state, table


_STATE_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}  # the last verified states: many dumps share one


def _load_state(state: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The state's tensors, verified against the hash that names them; cached, so callers must not modify them."""
    info = os.stat(state)
    key = (str(state.resolve()), info.st_ino, info.st_size, info.st_mtime_ns, sha256)
    if key not in _STATE_CACHE:
        tensors = _load_tensors(state, "state")
        if states.content_digest(tensors) != sha256:
            raise UserError(f"{state} does not hold the model state its name promises (its tensors hash "
                            f"differently); the file was changed or damaged, so {REDO['state']}.")
        _STATE_CACHE.clear()
        _STATE_CACHE[key] = tensors
    return dict(_STATE_CACHE[key])


def read_container(path: Path, kind: str) -> StoredFile:
    """The container only: kind, version, JSON metadata with the required keys, finite tensors.

    No schema and no tensor declarations: for tests and tools that handle files of any content.
    The stages read with `read`.
    """
    path = Path(path)
    raw = read_raw_metadata(path, kind)
    meta: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in ("format", "format_version"):
            try:
                meta[key] = json.loads(text)
            except (ValueError, RecursionError) as err:
                raise UserError(f"{path} has metadata {_clip(key)} that is not valid JSON; the file is damaged.") from err
    missing = [key for key in REQUIRED_METADATA[kind] if key not in meta]
    if missing:
        raise UserError(f"{path} lacks the metadata {', '.join(missing)} that {DESCRIPTIONS[kind]} must carry.")
    tensors = _load_tensors(path, kind)
    return StoredFile(kind=kind, tensors=tensors, meta=meta)


def _load_tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is damaged and cannot be read ({_short(err)}); capture or write it again.") from err
    for name, tensor in tensors.items():
        if not _all_finite(tensor):
            raise UserError(
                f"{path} holds NaN or infinite values in tensor {_clip(name)}; a usable {kind} file has only finite "
                f"numbers, so {REDO[kind]}."
            )
    return tensors


def kind_of(path: Path, kinds: tuple[str, ...]) -> str:
    """Which of `kinds` the file at `path` declares; anything else is the reader's usual one sentence."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, RuntimeError, ValueError):
        found = None  # read_raw_metadata below says what is wrong
    for kind in kinds:
        if found == FORMAT_NAMES[kind]:
            return kind
    try:
        read_raw_metadata(path, kinds[0])
    except UserError as err:
        message = str(err)
        expected = DESCRIPTIONS[kinds[0]]
        if len(kinds) > 1 and message.endswith(f"{expected}."):
            others = " or ".join(DESCRIPTIONS[k] for k in kinds)
            message = message[: -len(expected) - 1] + others + "."
        raise UserError(message) from err
    return kinds[0]


def read_meta(path: Path, kind: str) -> dict[str, Any]:
    """A file's validated metadata, without loading its tensors (cheap: the header only)."""
    path = Path(path)
    return _decode_metadata(path, kind, read_raw_metadata(path, kind))


def tensor_table(path: Path, kind: str) -> dict[str, tuple[str, list[int]]]:
    """Every tensor's safetensors dtype and shape, from the header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is damaged and cannot be read ({_short(err)}); expected {DESCRIPTIONS[kind]}.") from err


def read_raw_metadata(path: Path, kind: str) -> dict[str, str]:
    """The file's metadata strings, after checking that it is a precode file of `kind` and version."""
    path = Path(path)
    what = DESCRIPTIONS[kind]
    if not path.exists():
        raise UserError(f"{path} does not exist; expected {what}.")
    if not path.is_file():
        raise UserError(f"{path} is not a file; expected {what}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is not a valid safetensors file ({_short(err)}); expected {what}.") from err
    found = raw.get("format")
    if isinstance(found, str) and found.startswith("precode-") and found not in FORMAT_NAMES.values():
        raise UserError(f"{path} is a {_clip(found)} file, a kind this precode does not know; expected {what}.")
    if found not in FORMAT_NAMES.values():
        raise UserError(f"{path} is a safetensors file but not a precode file (no 'format' metadata); expected {what}.")
    if found != FORMAT_NAMES[kind]:
        other = next(k for k, v in FORMAT_NAMES.items() if v == found)
        raise UserError(f"{path} is {DESCRIPTIONS[other]}, not {what}.")
    version_text = raw.get("format_version", "")
    if not re.fullmatch(r"[0-9]+", version_text):
        raise UserError(f"{path} has an unreadable format_version {_clip(version_text)}; expected {VERSIONS[kind]}.")
    digits = version_text.lstrip("0") or "0"
    # int() refuses over 4300 digits (ValueError); any version that long is newer than this one anyway.
    version = int(digits) if len(digits) <= 18 else VERSIONS[kind] + 1
    if version > VERSIONS[kind]:
        raise UserError(
            f"{path} uses file format version {digits if len(digits) <= 18 else digits[:15] + '...'}, newer than the "
            f"version {VERSIONS[kind]} this precode reads; upgrade precode to read it."
        )
    if version < OLDEST[kind]:
        raise UserError(f"{path} uses file format version {version}, which this precode no longer reads.")
    if sum(len(k) + len(v) for k, v in raw.items()) > MAX_METADATA_BYTES:
        raise UserError(f"{path} has over {MAX_METADATA_BYTES} bytes of metadata; a precode file has far less.")
    return raw


def _decode_metadata(path: Path, kind: str, raw: dict[str, str]) -> dict[str, Any]:
    """JSON-decode the metadata and validate it against the kind's declared schema."""
    meta: dict[str, Any] = {}
    for key, text in raw.items():
        if key in ("format", "format_version"):
            continue
        try:
            meta[key] = json.loads(text)
        except (ValueError, RecursionError) as err:  # ValueError: bad JSON, or an integer of over 4300 digits
            raise UserError(f"{path} has metadata {_clip(key)} that is not valid JSON; the file is damaged.") from err
        if schemas.json_depth(meta[key]) > schemas.MAX_JSON_DEPTH:
            raise UserError(f"{path} has metadata {_clip(key)} nested deeper than {schemas.MAX_JSON_DEPTH} levels; "
                            "a precode file has far less.")
    missing = [key for key in REQUIRED_METADATA[kind] if key not in meta]
    if missing:
        raise UserError(f"{path} lacks the metadata {', '.join(missing)} that {DESCRIPTIONS[kind]} must carry.")
    try:
        schemas.SCHEMAS[kind].model_validate(meta)
    except schemas.ValidationError as err:
        raise UserError(f"{path} has metadata that does not fit the {FORMAT_NAMES[kind]} schema "
                        f"({schemas.first_error(err)}); see docs/file-format.md.") from err
    except UserError as err:  # a model spec's own checks
        raise UserError(f"{path} has a model spec this precode cannot use ({str(err).rstrip('.')}).") from err
    return meta


# Bytes per element of the safetensors dtypes; the schemas allow only F32, I64 and U8 in precode files.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
RNG_STATE = 5056  # bytes of a torch.Generator state on the CPU (Mersenne Twister)
MAX_DIMENSION = 2**31 - 1  # no side of a precode tensor is longer; longer ones overflow stride arithmetic
RNG_TENSORS = {"training-state": ("rng.shuffle", "rng.torch", "rng.noise"), "attack-state": ("rng", "rng.replay.")}


def _check_tensor_table(path: Path, kind: str, meta: dict[str, Any], table: dict[str, tuple[str, list[int]]],
                        profile: ProfileFn | None, version: int = 1) -> budget.ModelProfile | None:
    """Refuse any tensor the kind does not declare, and any declared tensor of the wrong dtype or shape.

    Returns the model's profile when `profile` measured it (a shared state is checked against it too).
    """
    model = _profile(path, meta, profile) if profile is not None and kind in _MODEL_KINDS else None
    expected = _declared_tensors(path, kind, meta, model, version)
    required = [name for name, rule in expected.items() if not name.endswith("*") and rule is not None
                and name not in _OPTIONAL.get(kind, ()) and not name.startswith(("grad.", factors.PREFIX))]
    _check_table(path, kind, expected, table, required)
    if kind == "gradients":
        _check_gradient_forms(path, kind, expected, table)
    return model


_MODEL_KINDS = ("model", "training-state", "gradients", "update")


def _check_table(path: Path, kind: str, expected: dict[str, Rule], table: dict[str, tuple[str, list[int]]],
                 required: list[str]) -> None:
    for name, (dtype, shape) in table.items():
        if any(side > MAX_DIMENSION for side in shape) or math.prod([max(side, 1) for side in shape]) > 2**62:
            raise UserError(f"{path} holds tensor {_clip(name)} with a dimension over {MAX_DIMENSION:,} or over "
                            f"2^62 elements counting empty sides as 1; {DESCRIPTIONS[kind]} has none that large.")
        rule = _rule_for(expected, name)
        if rule is None:
            raise UserError(f"{path} holds a tensor {_clip(name)} that {DESCRIPTIONS[kind]} does not have.")
        want_dtype, want_shape = rule
        if want_dtype is not None and dtype != want_dtype:
            raise UserError(f"{path} holds tensor {_clip(name)} as {_clip(dtype, 12)}; the format says {want_dtype}.")
        if want_shape is not None and not _shape_matches(shape, want_shape):
            raise UserError(f"{path} holds tensor {_clip(name)} of shape {_clip(str(shape), 40)}; "
                            f"its metadata says {_shape_text(want_shape)}.")
    missing = [name for name in required if name not in table]
    if missing:
        raise UserError(f"{path} lacks the tensor {_clip(missing[0])} that {DESCRIPTIONS[kind]} must hold "
                        "(by its metadata).")


def _check_gradient_forms(path: Path, kind: str, expected: dict[str, Rule],
                          table: dict[str, tuple[str, list[int]]]) -> None:
    """Each shared gradient is stored once: whole (`grad.P`) or as both its factors (`factor.P.left/right`)."""
    for name in table:
        if name.startswith(factors.PREFIX):
            param, _, side = name[len(factors.PREFIX):].rpartition(".")
            if side not in (factors.LEFT, factors.RIGHT) or not param:
                raise UserError(f"{path} holds a tensor {_clip(name)} that is not a factor.<parameter>.left or "
                                ".right of a factored gradient.")
            left, right = factors.names(param)
            if left not in table or right not in table:
                raise UserError(f"{path} holds only one of the factors {_clip(left)} and {_clip(right)}; a "
                                "factored gradient needs both.")
            if f"grad.{param}" in table:
                raise UserError(f"{path} holds the gradient of {_clip(param)} twice, whole and as factors; a dump "
                                "stores each gradient once.")
            if table[left][1][:1] != table[right][1][:1] or len(table[left][1]) != 2 or len(table[right][1]) != 2:
                raise UserError(f"{path} holds factors of {_clip(param)} that are not two matrices with the same "
                                "number of rows.")
    for name in expected:
        if name.startswith("grad.") and not name.endswith("*") and name not in table:
            if factors.names(name[len("grad."):])[0] not in table:
                raise UserError(f"{path} lacks the tensor {_clip(name)} that {DESCRIPTIONS[kind]} must hold "
                                "(by its metadata).")


_OPTIONAL = {"training-state": ("rng.cuda", "rng.noise"), "gradients": (), "update": (),
             "attack-state": ("stopped", "skipped")}
Rule = tuple[Any, Any]  # (dtype or None for any, shape: a list of ints and None for "any size", or None for any)
ProfileFn = Callable[[dict[str, Any]], "budget.ModelProfile"]


def _state_rules(model: budget.ModelProfile | None) -> dict[str, Rule]:
    """The model state's tensors: `param.*` (F32) and `buffer.*`, with the model's shapes when it is known."""
    if model is None:
        return {"param.*": ("F32", None), "buffer.*": (None, None)}
    rules: dict[str, Rule] = {f"param.{name}": ("F32", list(shape)) for name, (shape, _) in model.params.items()}
    rules.update({f"buffer.{name}": (dtype, list(shape)) for name, (shape, dtype) in model.buffers.items()})
    return rules


def _declared_tensors(path: Path, kind: str, meta: dict[str, Any], model: budget.ModelProfile | None,
                      version: int = 1) -> dict[str, Rule]:
    """Tensor name (a trailing * is a prefix) -> (dtype, shape), from the validated metadata."""
    if kind in ("truth", "reconstruction"):
        batch, image = meta["data"]["batch_size"], meta["data"]["input_shape"]
        rules: dict[str, Rule] = {"images": ("F32", [batch, *image]), "labels": ("I64", [batch])}
        if kind == "truth":
            rules["indices"] = ("I64", [batch])
        else:
            done = meta["attack"].get("iterations_done")
            rules["loss_trace"] = ("F32", [done])
        return rules
    if kind == "attack-state":
        rules = {"inputs": ("F32", [None] * 5), "traces": ("F32", [None, None]), "rng": ("U8", [RNG_STATE]),
                 "rng.replay.*": ("U8", [None]), "noise.*": ("F32", None), "adam.*": ("F32", None),
                 "stopped": ("I64", [None]), "skipped": ("I64", [None])}
        return rules
    if kind == "state":  # read on its own; a dump that names it checks the shapes (`_shared_state`)
        return _state_rules(None)
    shared_state = kind in SHARED_STATE_KINDS and version >= 2 and meta.get("state") is not None
    state = {} if shared_state else _state_rules(model)
    if model is None:  # names and dtypes only: the model's shapes need the defenses, which the stages know
        if kind == "model":
            return {"*": (None, None)}
        if kind == "training-state":
            return {"model.*": (None, None), "optimizer.*": ("F32", None), "rng.shuffle": ("U8", [RNG_STATE]),
                    "rng.torch": ("U8", [RNG_STATE]), "rng.noise": ("U8", None), "rng.cuda": ("U8", None)}
        rules = dict(state)
        rules["grad.*" if kind == "gradients" else "returned.*"] = ("F32", None)
        if kind == "gradients" and version >= 2:
            rules[factors.PREFIX + "*"] = ("F32", None)
        if meta["capture"]["labels_shared"]:
            rules["labels"] = ("I64", [meta["data"]["batch_size"]])
        rules.update(_bn_stats_rules(path, kind, meta, None))
        return rules
    if kind == "model":
        return {name[len("param."):] if name.startswith("param.") else name[len("buffer."):]: rule
                for name, rule in state.items()}
    if kind == "training-state":
        rules = {"model." + (name[len("param."):] if name.startswith("param.") else name[len("buffer."):]): rule
                 for name, rule in state.items()}
        rules.update({"optimizer.*": ("F32", None), "rng.shuffle": ("U8", [RNG_STATE]),
                      "rng.torch": ("U8", [RNG_STATE]), "rng.noise": ("U8", None), "rng.cuda": ("U8", None)})
        return rules
    # gradients, update
    shared = "grad" if kind == "gradients" else "returned"
    rules = {f"{shared}.{name}": ("F32", list(shape)) for name, (shape, trainable) in model.params.items() if trainable}
    if kind == "gradients" and version >= 2:
        batch = meta["data"]["batch_size"]
        for name, (shape, trainable) in model.params.items():
            if trainable and len(shape) == 2:
                left, right = factors.names(name)
                rules[left], rules[right] = ("F32", [batch, shape[0]]), ("F32", [batch, shape[1]])
    rules.update(state)
    if meta["capture"]["labels_shared"]:
        rules["labels"] = ("I64", [meta["data"]["batch_size"]])
    rules.update(_bn_stats_rules(path, kind, meta, model))
    return rules


def _bn_stats_rules(path: Path, kind: str, meta: dict[str, Any],
                    model: budget.ModelProfile | None) -> dict[str, Rule]:
    """A gradient dump's recorded BatchNorm statistics (`bn_stats`): F32 [channels] per listed layer, the
    channels read off the model's `running_mean` when the model is known; none when the dump records none
    (an update declares no `bn_stats`, so any key of that name in one is ignored, and its tensors refused)."""
    recorded = meta.get("bn_stats") if kind == "gradients" else None
    if recorded is None:
        return {}
    rules: dict[str, Rule] = {}
    for layer in recorded["layers"]:
        shape: list[int | None] = [None]
        if model is not None:
            mean, var = model.buffers.get(f"{layer}.running_mean"), model.buffers.get(f"{layer}.running_var")
            if mean is None or var is None or len(mean[0]) != 1:
                raise UserError(f"{path} records BatchNorm statistics of {_clip(layer)}, which is not a BatchNorm "
                                "layer with running statistics in its model.")
            shape = list(mean[0])
        for name in bn_stats.names(layer):
            rules[name] = ("F32", shape)
    return rules


def _profile(path: Path, meta: dict[str, Any], profile: ProfileFn) -> budget.ModelProfile:
    try:
        return profile(meta)
    except UserError as err:
        message = str(err)
        raise UserError(message if str(path) in message else f"{path}: {message}") from err


def _rule_for(expected: dict[str, Rule], name: str) -> Rule | None:
    if name in expected:
        return expected[name]
    for pattern, rule in expected.items():
        if pattern.endswith("*") and name.startswith(pattern[:-1]) and len(name) > len(pattern) - 1:
            return rule
    return None


def _shape_matches(shape: list[int], want: list[int | None]) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def _shape_text(want: list[int | None]) -> str:
    return "[" + ", ".join("N" if w is None else str(w) for w in want) + "]"


def _check_values(path: Path, kind: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Rules on tensor values that the metadata fixes: labels within the classes, truth indices."""
    labels = tensors.get("labels")
    if labels is not None and labels.numel():
        classes = meta["model"]["num_classes"] if "model" in meta else meta["data"]["num_classes"]
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise UserError(f"{path} holds a label {low if low < 0 else high} outside 0..{classes - 1}.")
    if kind == "truth":
        start, stop = meta["indices"]
        indices = tensors["indices"]
        if meta.get("pick") in (None, "first"):
            if not torch.equal(indices, torch.arange(start, stop)):
                raise UserError(f"{path} holds indices that are not {start}..{stop - 1} as its metadata says.")
        elif indices.numel() and (int(indices.min()) < 0 or indices.unique().numel() != indices.numel()):
            raise UserError(f"{path} holds indices that are not distinct positions in the split "
                            "(negative or repeated), as `pick: random` needs.")
    for name, tensor in tensors.items():
        if name.startswith(RNG_TENSORS.get(kind, ("\0",))) and tensor.numel() == RNG_STATE:
            try:
                torch.Generator().set_state(tensor)
            except RuntimeError as err:
                raise UserError(f"{path} holds a random generator state {_clip(name)} that is not valid "
                                f"({_short(err)}); {REDO[kind]}.") from err
    if kind in ("truth", "reconstruction"):
        images = tensors["images"]
        if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
            raise UserError(f"{path} holds images outside the pixel range [0, 1].")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes: ties a truth file and a reconstruction to the dump they belong to."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def update_digest(returned: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of the weights a client sent back (name, dtype, shape and bytes of each, by name).

    Both sides of a Flower run can compute it: the client's truth mod from its reply, precode's
    recorder from the update file (`returned.*`), so a truth file written on the client finds the
    update the server recorded.
    """
    digest = hashlib.sha256()
    for name in sorted(returned):
        tensor = returned[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}|{list(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in a floating-point or complex tensor (integer tensors always pass)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if not tensor.is_floating_point():
        return True
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)  # float8 formats: torch.isfinite is not implemented for them
    return bool(torch.isfinite(tensor).all())


def _clip(text: str, limit: int = 60) -> str:
    """`repr(text)`, shortened: a hostile file's names and values must not flood the one-line message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]
