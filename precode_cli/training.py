"""Train a classifier with the client's loss (cross-entropy plus any defense's term).

The loss function, and optionally the whole client step (a defense may clip, prune or noise the
gradient before the optimiser sees it), come from the caller, so the core needs no knowledge of
defenses. A `Trainer` can hand out its whole state (weights, optimiser moments, random generators,
history) as tensors and JSON, and take it back, so an interrupted run resumes to the same result.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from precode_cli.data import ImageSet, normalize
from precode_cli.errors import UserError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# (model, inputs, labels, generator) -> an object with .loss, .logits and .grads (parameter name -> gradient)
GradientFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], Any]
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainConfig:
    """The optimisation settings of a run."""

    epochs: int
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    seed: int = 0


def choose_device(name: str) -> torch.device:
    """`--device`: auto picks cuda, then mps, then cpu; a named device must be available."""
    if name not in DEVICES:
        raise UserError(f"unknown --device {name!r}; choose one of: {', '.join(DEVICES)}.")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu.")
    if name == "mps" and not has_mps:
        raise UserError("--device mps was asked for, but PyTorch sees no Apple GPU here; use --device cpu.")
    return torch.device(name)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum, over every parameter."""
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {config.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}.")
    if not config.lr > 0:  # also refuses NaN
        raise UserError(f"--lr must be positive, not {config.lr}.")
    if not config.weight_decay >= 0:
        raise UserError(f"--weight-decay must be non-negative, not {config.weight_decay}.")
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if not 0 <= config.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), not {config.momentum}.")
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


class Trainer:
    """Epochs of minibatch training and evaluation, resumable at every epoch boundary."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_set: ImageSet,
        test_set: ImageSet,
        data_spec: dict[str, Any],
        config: TrainConfig,
        device: torch.device | None = None,
        gradient_fn: GradientFn | None = None,
    ) -> None:
        """`gradient_fn`, when given, computes each step's gradient (the client's, with its defenses);
        else the gradient of `loss_fn` by plain backpropagation."""
        self.device = device or torch.device("cpu")
        self.gradient_fn = gradient_fn
        self.model = model.to(self.device)
        self.loss_fn, self.train_set, self.test_set = loss_fn, train_set, test_set
        self.data_spec, self.config = data_spec, config
        self.optimizer = make_optimizer(self.model, config)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        # Noise a defense adds to the gradient, drawn on the training device, seeded apart from the shuffle.
        self.noise = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.step_times: list[float] = []  # seconds of every training step of this process, for benchmarks

    def run(
        self,
        on_step: Callable[[], None] | None = None,
        on_epoch: Callable[["Trainer"], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train from the current epoch to `config.epochs`; `on_epoch` runs after each (checkpoints)."""
        while self.epoch < self.config.epochs:
            self.history.append(self._train_epoch(on_step))
            self.epoch += 1
            if on_epoch is not None:
                on_epoch(self)
        return self.history

    def _train_epoch(self, on_step: Callable[[], None] | None) -> dict[str, float]:
        self.model.train()
        started = time.perf_counter()
        order = torch.randperm(len(self.train_set), generator=self.shuffle)
        total_loss, correct, step_times = 0.0, 0, []
        for start in range(0, len(order), self.config.batch_size):
            step_started = time.perf_counter()
            idx = order[start : start + self.config.batch_size]
            x = normalize(self.train_set.images[idx], self.data_spec).to(self.device)
            y = self.train_set.labels[idx].to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            if self.gradient_fn is None:
                logits = self.model(x)
                loss = self.loss_fn(self.model, logits, y)
                loss.backward()
            else:
                step = self.gradient_fn(self.model, x, y, self.noise)
                loss, logits = step.loss, step.logits
                for name, param in self.model.named_parameters():
                    if name in step.grads:
                        param.grad = step.grads[name]
            self.optimizer.step()
            total_loss += loss.item() * len(idx)  # .item() waits for the device, so the step time is real
            correct += (logits.argmax(1) == y).sum().item()
            step_times.append(time.perf_counter() - step_started)
            self.step_times.append(step_times[-1])
            if on_step is not None:
                on_step()
        test_loss, test_accuracy = evaluate(self.model, self.loss_fn, self.test_set, self.data_spec,
                                            self.config.batch_size, self.device)
        return {
            "epoch": self.epoch + 1,
            "train_loss": total_loss / len(self.train_set),
            "train_accuracy": correct / len(self.train_set),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "seconds": time.perf_counter() - started,
            "step_seconds_median": statistics.median(step_times) if step_times else 0.0,
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything `load_state` needs to continue exactly here: tensors and JSON-able metadata."""
        tensors = {f"model.{name}": t for name, t in self.model.state_dict().items()}
        for index, slots in self.optimizer.state_dict()["state"].items():
            for slot, value in slots.items():
                tensors[f"optimizer.{index}.{slot}"] = torch.as_tensor(value)
        tensors["rng.shuffle"] = self.shuffle.get_state()
        tensors["rng.noise"] = self.noise.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors, {"epoch": self.epoch, "history": self.history, "device": self.device.type}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from a `state()` written earlier (same model, optimiser and data)."""
        model_state = {k[len("model."):]: t for k, t in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, slot = key.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value.to(self.device) if slot != "step" else value
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": slots, "param_groups": groups})
        self.shuffle.set_state(tensors["rng.shuffle"])
        if "rng.noise" in tensors and meta.get("device") == self.device.type:
            self.noise.set_state(tensors["rng.noise"])
        else:  # resumed on another kind of device, whose generator state has another form: reseed per epoch
            self.noise.manual_seed(self.config.seed + 1 + int(meta["epoch"]))
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.epoch = int(meta["epoch"])
        self.history = list(meta["history"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    data: ImageSet,
    data_spec: dict[str, Any],
    batch_size: int,
    device: torch.device | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy on a split, in eval mode."""
    device = device or torch.device("cpu")
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start : start + batch_size], data_spec).to(device)
        y = data.labels[start : start + batch_size].to(device)
        logits = model(x)
        total_loss += loss_fn(model, logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    return total_loss / max(len(data), 1), correct / max(len(data), 1)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of `n` examples."""
    return (n + batch_size - 1) // batch_size
