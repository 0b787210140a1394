"""Model builders: one function per architecture, looked up by the name users pass to --model.

A model is fully described by a JSON-able spec, so any stage can rebuild it from a file:
    {"name": "mlp", "kwargs": {"width": 1024}, "input_shape": [3, 32, 32], "num_classes": 10}
Every builder takes (input_shape, num_classes, **options) and works for 1 or 3 channels and
28 to 224 pixels. A user's own model is `--model package.module:builder`. Defenses that change
the architecture (PRECODE) are applied afterwards by `defenses`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable

from torch import nn

from precode_cli.errors import UserError
from precode_cli.models import imprint
from precode_cli.models.cnn import cnn
from precode_cli.models.convnet import convnet
from precode_cli.models.lenet import lenet
from precode_cli.models.mlp import mlp
from precode_cli.models.resnet import NORMS, resnet18

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "lenet": lenet,
    "convnet": convnet,
    "resnet18": resnet18,
}
# The options each builder takes, as (--option name, allowed values or None for any positive int).
OPTIONS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "mlp": {"width": None},
    "cnn": {"width": None},
    "lenet": {},
    "convnet": {"width": None},
    "resnet18": {"norm": NORMS},
}


def is_user_builder(name: str) -> bool:
    """Whether `name` is a user's `package.module:builder` rather than a built-in architecture."""
    return ":" in name


def make_spec(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> dict[str, Any]:
    """A model spec as stored in every file's `model` metadata; options left at None are dropped."""
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if is_user_builder(name):
        if kwargs:
            raise UserError(f"--{', --'.join(kwargs)}: options like these are for the built-in models only; "
                            f"{name} is built by your own code, which takes none.")
    elif name not in BUILDERS:
        raise UserError(f"unknown --model {name!r}; choose one of: {', '.join(BUILDERS)}, or package.module:builder.")
    else:
        _check_options(name, kwargs)
    return {"name": name, "kwargs": kwargs, "input_shape": list(input_shape), "num_classes": int(num_classes)}


def build(spec: dict[str, Any], trusted_builder: str | None = None) -> nn.Module:
    """Build the undefended model a spec describes, with freshly initialised weights (and, when the spec
    has one, a malicious server's imprint module in front: precode_cli/models/imprint.py).

    A spec naming user code is built only when `trusted_builder` (what the user typed as --model)
    names the same code: importing whatever a file names would let a gradient dump run code.
    """
    name = spec.get("name")
    if not isinstance(name, str):
        raise UserError("the file's model spec has no model name.")
    shape, classes = tuple(spec.get("input_shape", ())), spec.get("num_classes")
    if is_user_builder(name):
        if trusted_builder != name:
            raise UserError(f"the file's model is built by your own code {name!r}; precode imports code only when you "
                            f"name it, so add --model {name} (to attack: --trust-builder {name}) if you trust it.")
        model = _build_user_model(name, shape, classes)
    elif name not in BUILDERS:
        raise UserError(f"unknown model {name!r} in the file's model spec; this precode knows: {', '.join(BUILDERS)}.")
    else:
        kwargs = dict(spec.get("kwargs", {}))
        _check_options(name, kwargs)
        try:
            model = BUILDERS[name](shape, int(classes), **kwargs)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"the file's {name} model spec cannot be built ({_clip(err)}).") from err
    if spec.get("imprint") is not None:  # a malicious server's binning module in front (capture --threat imprint)
        imprint.attach(model, spec["imprint"], shape)
    return model


def _check_options(name: str, kwargs: dict[str, Any]) -> None:
    allowed = OPTIONS[name]
    for key, value in kwargs.items():
        if key not in allowed:
            takes = ", ".join(f"--{k}" for k in allowed) or "no options"
            raise UserError(f"--model {name} does not take --{key}; it takes {takes}.")
        choices = allowed[key]
        if choices is None and not (isinstance(value, int) and value >= 1):
            raise UserError(f"--{key} must be a positive whole number, not {value!r}.")
        if choices is not None and value not in choices:
            raise UserError(f"--{key} must be one of {', '.join(choices)}, not {value!r}.")


def _build_user_model(name: str, input_shape: tuple[int, ...], num_classes: Any) -> nn.Module:
    """Import `package.module:builder` (the working directory is importable) and call it."""
    module_name, _, attribute = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--model {name}: cannot import {attribute!r} from {module_name!r} ({_clip(err)}).") from err
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing: their bug, not ours
        raise UserError(f"--model {name}: importing {module_name!r} failed with {_their_error(err)}; "
                        "fix your module.") from err
    if not callable(builder):
        raise UserError(f"--model {name}: {attribute!r} is not callable; give a function that returns an nn.Module.")
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError) as err:
        raise UserError(f"--model {name}: cannot read the signature of {attribute!r} ({_their_error(err)}); "
                        "give a Python function that takes input_shape and num_classes.") from err
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    offered = {"input_shape": input_shape, "num_classes": int(num_classes)}
    kwargs = {key: value for key, value in offered.items() if takes_any or key in parameters}
    try:
        model = builder(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's builder failed: their bug, reported as theirs
        raise UserError(f"--model {name} raised {_their_error(err)}; fix your builder.") from err
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {name} returned {_clip(type(model).__name__)}, not a torch nn.Module; "
                        "fix your builder.")
    return model


def _clip(text: str, limit: int = 160) -> str:
    """One line of at most `limit` characters: the user's code chooses this text, not precode."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _their_error(err: BaseException) -> str:
    """`ValueError: message`, on one line and shortened, for an exception raised by the user's code."""
    try:
        message = str(err)
    except Exception:  # noqa: BLE001 - even __str__ is the user's code
        message = ""
    kind = _clip(type(err).__name__, 60)
    return f"{kind}: {_clip(message)}" if message.strip() else kind
