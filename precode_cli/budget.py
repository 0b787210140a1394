"""What a command will cost, computed from validated metadata and options before any real work.

A file's metadata says which model to build, for which input shape and batch: a hostile file can
ask for a model of any size. So the model is first built on PyTorch's `meta` device, which records
shapes and allocates nothing (`precode_cli/stages/profiles.py`, which knows the defenses); its
parameter count and the activations of one forward pass (a `ModelProfile`) give the memory that
building, capturing, attacking or training would take. Anything over the limit is
refused in one sentence that names the limit and the option that raises it (`--max-memory`).

The estimates are deliberately simple, upper-bound-ish formulas (documented in docs/security.md);
they exist to refuse the absurd before allocating it, not to predict peak memory to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from precode_cli.errors import UserError

GIB = 1024**3
DEFAULT_MAX_MEMORY_GIB = 8.0
OPTION = "--max-memory"
FLOAT_BYTES = 4
_limit = {"bytes": int(DEFAULT_MAX_MEMORY_GIB * GIB)}


def set_max_memory(gib: float | None) -> None:
    """`--max-memory GIB` of the running command (None: the default)."""
    value = DEFAULT_MAX_MEMORY_GIB if gib is None else float(gib)
    if not value > 0 or value != value or value == float("inf"):
        raise UserError(f"{OPTION} must be a positive number of GiB, not {gib}.")
    _limit["bytes"] = int(value * GIB)


def max_memory() -> int:
    """The current limit in bytes."""
    return _limit["bytes"]


def require(what: str, nbytes: int, lower_it: str | None = None) -> None:
    """Refuse `what` if it would take more than the memory limit."""
    if nbytes <= _limit["bytes"]:
        return
    hint = f" {lower_it}, or" if lower_it else ""
    raise UserError(f"{what} would need about {_size(nbytes)} of memory, over the limit of {_size(_limit['bytes'])};"
                    f"{hint} raise the limit with {OPTION} GIB if this machine has the room.")


@dataclass(frozen=True)
class ModelProfile:
    """A model's shapes and sizes, known without allocating it."""

    params: dict[str, tuple[tuple[int, ...], bool]]  # name -> (shape, requires_grad)
    buffers: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, safetensors dtype)
    n_params: int
    activations: int  # floats one example's forward pass produces (all leaf modules' outputs)

    @property
    def param_bytes(self) -> int:
        return FLOAT_BYTES * self.n_params


ATTACK_ACTIVATION_COPIES = 12  # measured: an 8x8..128x128 MLP attack at batch 4096 peaks near 12 x its activations


def attack_bytes(model: ModelProfile, batch: int, victims: int, restarts: int) -> int:
    """An optimisation attack on `victims` dumps at once: weights, shared gradients, and for every row of
    every restart the dummy inputs with their Adam moments and the graph of a double backward pass."""
    rows = victims * max(1, restarts)
    return FLOAT_BYTES * (3 * model.n_params + victims * model.n_params
                          + ATTACK_ACTIVATION_COPIES * rows * batch * model.activations)


def unrolled_attack_bytes(model: ModelProfile, batch: int, victims: int, restarts: int, steps: int,
                          factored: bool) -> int:
    """An attack that replays `steps` local steps: every step's graph is kept for the outer backward pass.

    The factored engine (Linear-only models) keeps activations only; the generic one a set of weights
    per row and step (the weights, their gradient and the update, with their backward buffers).
    """
    rows = victims * max(1, restarts)
    per_step = attack_bytes(model, batch, victims, restarts) - FLOAT_BYTES * (3 + victims) * model.n_params
    weights = 0 if factored else FLOAT_BYTES * 6 * rows * steps * model.n_params
    return FLOAT_BYTES * (3 + victims) * model.n_params + steps * per_step + weights


def capture_bytes(model: ModelProfile, batch: int) -> int:
    """One client step: weights, gradient and a copy for the dump, and one backward pass's activations."""
    return FLOAT_BYTES * (4 * model.n_params + 3 * batch * model.activations)


def train_bytes(model: ModelProfile, batch: int) -> int:
    """Training: weights, gradient, two optimiser moments, a checkpoint copy, and one backward pass."""
    return FLOAT_BYTES * (5 * model.n_params + 3 * batch * model.activations)


def _size(nbytes: int) -> str:
    if nbytes >= GIB:
        return f"{nbytes / GIB:.1f} GiB"
    return f"{nbytes / 1024**2:.0f} MiB"
