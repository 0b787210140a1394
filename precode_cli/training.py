"""Train a classifier with the client's loss (cross-entropy plus any defense's term).

The loss function comes from the caller, so the core needs no knowledge of defenses.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from precode_cli.data import ImageSet, normalize

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_set: ImageSet,
    test_set: ImageSet,
    data_spec: dict[str, Any],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    """Adam training for `epochs`; returns one history row per epoch (train and test loss/accuracy)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    inputs = normalize(train_set.images, data_spec)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_set), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x, y = inputs[idx], train_set.labels[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(model, logits, y)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            if on_step is not None:
                on_step()
        test_loss, test_accuracy = evaluate(model, loss_fn, test_set, data_spec, batch_size)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total_loss / len(train_set),
                "train_accuracy": correct / len(train_set),
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "seconds": time.perf_counter() - started,
            }
        )
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, data: ImageSet, data_spec: dict[str, Any], batch_size: int
) -> tuple[float, float]:
    """Mean loss and accuracy on a split, in eval mode."""
    model.eval()
    inputs = normalize(data.images, data_spec)
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x, y = inputs[start : start + batch_size], data.labels[start : start + batch_size]
        logits = model(x)
        total_loss += loss_fn(model, logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    return total_loss / max(len(data), 1), correct / max(len(data), 1)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of `n` examples."""
    return (n + batch_size - 1) // batch_size
