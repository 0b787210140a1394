"""Analytic first-layer recovery, DLG and iDLG: known answers on tiny in-memory models (seconds in all)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.analytic import AnalyticFirstLayer
from attacks.base import AttackTarget
from attacks.dlg import DeepLeakage, ImprovedDeepLeakage, soft_label_loss
from defenses.precode import insert_vb, vb_loss
from precode_cli.errors import UserError

SHAPE = (3, 8, 8)
LABEL = 3


def plain_loss(_model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def precode_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels) + vb_loss(model)


def tiny_mlp(activation: type[nn.Module] = nn.ReLU, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 64, bias=bias), activation(), nn.Linear(64, 10))


def make_target(model: nn.Module, loss_fn=plain_loss, batch_size: int = 1, share_labels: bool = True,
                seed: int = 0, shape: tuple[int, ...] = SHAPE) -> tuple[AttackTarget, torch.Tensor, torch.Tensor]:
    """The server's view of one client step on a random image in normalised space; also the truth."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *shape, generator=generator).clamp(-2.5, 2.5)
    y = torch.arange(LABEL, LABEL + batch_size) % 10
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss_fn(model, model(x), y), params)
    target = AttackTarget(
        model=model, loss_fn=loss_fn, param_names=list(names), shared_grads=[g.detach() for g in grads],
        labels=y if share_labels else None, batch_size=batch_size, input_shape=shape, num_classes=10,
        lower=torch.full((1, shape[0], 1, 1), -3.0), upper=torch.full((1, shape[0], 1, 1), 3.0),
    )
    return target, x, y


@pytest.fixture(autouse=True)
def _fixed_weights():
    torch.manual_seed(0)  # model initialisation in every test


# --- analytic -----------------------------------------------------------------------------------


@pytest.mark.parametrize("defense", ["none", "precode", "precode_first"])
@pytest.mark.parametrize("share_labels", [True, False])
def test_analytic_recovers_the_exact_image(defense, share_labels):
    """PRECODE before the last layer does not protect; in front of the first, its encoder leaks instead."""
    model, loss_fn = tiny_mlp(), plain_loss
    if defense != "none":
        model, loss_fn = insert_vb(model, SHAPE, at="1" if defense == "precode_first" else None), precode_loss
    target, x, y = make_target(model, loss_fn, share_labels=share_labels)
    rng_before = torch.get_rng_state()
    result = AnalyticFirstLayer(iterations=7000, lr=0.01, tv_weight=1e-6).run(target, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no randomness used, none consumed
    assert result.inputs.shape == (1, *SHAPE) and result.inputs.dtype == torch.float32
    assert (result.inputs - x).abs().max() < 1e-4
    assert result.labels.tolist() == y.tolist() and result.labels.dtype == torch.int64
    assert result.label_source == ("dump" if share_labels else "recovered")
    assert result.loss_trace.dtype == torch.float32 and result.loss_trace.shape == (1,)
    assert result.loss_trace[0] < 1e-4  # the weight gradient is rank one: db x^T


class DeclaredOutOfOrder(nn.Module):
    """The output layer is declared first; execution order, not declaration order, decides."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 10)
        self.body = nn.Linear(math.prod(SHAPE), 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x.flatten(1))))


def test_analytic_finds_the_first_layer_in_execution_order():
    target, x, _y = make_target(DeclaredOutOfOrder())
    assert (AnalyticFirstLayer().run(target, seed=0).inputs - x).abs().max() < 1e-4


def test_analytic_refuses_models_without_a_fully_connected_first_layer():
    conv = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Flatten(), nn.Linear(math.prod(SHAPE), 10))
    with pytest.raises(UserError, match="fully connected first layer with bias.*Conv2d"):
        AnalyticFirstLayer().run(make_target(conv)[0], seed=0)
    normalised = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(math.prod(SHAPE), 10))
    with pytest.raises(UserError, match="BatchNorm2d"):
        AnalyticFirstLayer().run(make_target(normalised)[0], seed=0)
    with pytest.raises(UserError, match="Linear without bias"):
        AnalyticFirstLayer().run(make_target(tiny_mlp(bias=False))[0], seed=0)


def test_analytic_refuses_a_batch():
    with pytest.raises(UserError, match="one image per dump.*--batch-size 1"):
        AnalyticFirstLayer().run(make_target(tiny_mlp(), batch_size=2)[0], seed=0)


def test_analytic_records_no_settings():
    assert AnalyticFirstLayer(iterations=5, lr=1.0, tv_weight=0.0).params() == {}


# --- DLG / iDLG ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", [DeepLeakage, ImprovedDeepLeakage])
@pytest.mark.parametrize("share_labels", [True, False])
def test_dlg_and_idlg_recover_the_image_of_an_undefended_model(attack, share_labels):
    target, x, y = make_target(tiny_mlp(nn.Sigmoid), share_labels=share_labels)
    steps: list[int] = []
    result = attack(iterations=20).run(target, seed=0, progress=steps.append)
    mse = F.mse_loss(result.inputs, x).item()
    assert mse < 1e-4, f"{attack.name}: MSE {mse:.2e} after 20 L-BFGS steps"
    assert result.labels.tolist() == y.tolist() and result.labels.dtype == torch.int64
    expected_source = "dump" if share_labels else {"dlg": "optimized", "idlg": "recovered"}[attack.name]
    assert result.label_source == expected_source
    assert result.loss_trace.shape == (20,) and result.loss_trace.dtype == torch.float32
    assert result.loss_trace[-1] < 1e-3 * result.loss_trace[0]
    assert steps == list(range(1, 21))
    assert result.stopped_at is None and result.note is None


@pytest.mark.parametrize("attack", [DeepLeakage, ImprovedDeepLeakage])
def test_same_seed_gives_identical_results(attack):
    """Also against PRECODE, whose sampling must be replayed from the seed."""
    target, _x, _y = make_target(insert_vb(tiny_mlp(), SHAPE), precode_loss, share_labels=False)
    a, b, c = (attack(iterations=3).run(target, seed=seed) for seed in (5, 5, 6))
    for key in ("inputs", "labels", "loss_trace"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert not torch.equal(a.inputs, c.inputs)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_finite_input():
    calls = {"n": 0}

    def breaks_on_call_7(model, logits, labels):
        calls["n"] += 1
        loss = F.cross_entropy(logits, labels)
        return loss * float("nan") if calls["n"] >= 7 else loss

    target, _x, _y = make_target(tiny_mlp(nn.Sigmoid))
    target.loss_fn = breaks_on_call_7
    result = ImprovedDeepLeakage(iterations=10).run(target, seed=0)
    assert result.stopped_at is not None and result.stopped_at < 10
    assert "non-finite" in result.note
    assert torch.isfinite(result.inputs).all() and torch.isfinite(result.loss_trace).all()
    assert result.loss_trace.shape == (10,)
    assert (result.loss_trace[result.stopped_at:] == result.loss_trace[-1]).all()


def test_soft_label_loss_adds_the_client_defense_term():
    """With a confident dummy label, the soft loss is the client's hard loss, PRECODE's KL included."""
    model = insert_vb(tiny_mlp(), SHAPE)
    target, x, y = make_target(model, precode_loss)
    torch.manual_seed(1)
    logits = model(x)
    confident = F.one_hot(y, 10).float() * 100.0
    assert torch.allclose(soft_label_loss(target, logits, confident), precode_loss(model, logits, y), atol=1e-5)
    assert vb_loss(model) > 0


def test_ignored_layers_are_left_out_of_the_distance():
    target, x, _y = make_target(tiny_mlp(nn.Sigmoid))
    result = ImprovedDeepLeakage(iterations=20, ignore_layers=["3"]).run(target, seed=0)
    assert F.mse_loss(result.inputs, x).item() < 1e-4  # the first layer alone pins the image down
    with pytest.raises(UserError, match="'classifier'"):
        ImprovedDeepLeakage(ignore_layers=["classifier"]).run(target, seed=0)
    with pytest.raises(UserError, match="no gradient to match"):
        ImprovedDeepLeakage(ignore_layers=["1", "3"]).run(target, seed=0)


def test_dlg_settings_defaults_and_validation():
    attack = DeepLeakage(iterations=None, lr=None, tv_weight=1e-6)  # None: the attack's own default
    assert attack.params() == {
        "iterations": 300, "lr": 1.0, "optimizer": "lbfgs", "max_iter": 20, "history_size": 100,
        "distance": "squared_l2", "init": "randn", "ignore_layers": [],
    }
    assert ImprovedDeepLeakage().params() == attack.params()
    with pytest.raises(UserError, match="--iterations"):
        DeepLeakage(iterations=0)
    with pytest.raises(UserError, match="--lr"):
        ImprovedDeepLeakage(lr=float("nan"))
    with pytest.raises(UserError, match="ignore_layers"):
        DeepLeakage(ignore_layers=[""])
