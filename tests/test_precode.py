"""PRECODE's variational bottleneck: sampling, shapes, placement, KL and the client's loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses import DefenseStack, REGISTRY, stack_from_cli
from defenses.precode import (
    Precode,
    VariationalBottleneck,
    insert_vb,
    kl_to_standard_normal,
    last_linear_name,
    vb_loss,
)
from precode_cli import models
from precode_cli.errors import UserError

SMALL_MLP = {"name": "mlp", "kwargs": {"width": 32}, "input_shape": [3, 8, 8], "num_classes": 5}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vb_samples_on_every_forward(mode):
    torch.manual_seed(0)
    vb = VariationalBottleneck((16,), k=8)
    vb.train(mode == "train")
    x = torch.randn(4, 16)
    with torch.no_grad():
        a, b = vb(x), vb(x)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_precode_model_is_stochastic_in_both_modes(mode):
    torch.manual_seed(0)
    model = stack_from_cli("precode", precode_k=16, precode_beta=1e-3).build_model(SMALL_MLP)
    plain = stack_from_cli("none").build_model(SMALL_MLP)
    model.train(mode == "train")
    plain.train(mode == "train")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        assert torch.equal(plain(x), plain(x))  # the randomness comes from the bottleneck only


def test_vb_sampling_follows_the_global_seed():
    vb = VariationalBottleneck((16,), k=8)
    x = torch.randn(3, 16)
    torch.manual_seed(5)
    a = vb(x)
    torch.manual_seed(5)
    b = vb(x)
    assert torch.equal(a, b)


def test_vb_output_shape_flat():
    vb = VariationalBottleneck((24,), k=4)
    x = torch.randn(5, 24)
    y = vb(x)
    assert y.shape == x.shape
    assert vb.encoder.out_features == 8 and vb.decoder.in_features == 4


def test_vb_output_shape_conv_feature_map():
    vb = VariationalBottleneck((6, 5, 7), k=10)
    x = torch.randn(3, 6, 5, 7)
    y = vb(x)
    assert y.shape == x.shape
    assert vb.encoder.in_features == 6 * 5 * 7
    y.sum().backward()  # differentiable end to end
    assert vb.encoder.weight.grad is not None


def test_insert_vb_in_a_conv_net_keeps_the_shape():
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("act", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(2))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(16, 3))
    insert_vb(net, (3, 8, 8), at="pool", k=6)
    assert isinstance(net.pool.bottleneck, VariationalBottleneck)
    assert net.pool.bottleneck.feature_shape == (4, 8, 8)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_insert_vb_default_position_is_before_the_last_linear():
    torch.manual_seed(0)
    model = models.build({"name": "mlp", "kwargs": {}, "input_shape": [3, 32, 32], "num_classes": 10})
    assert last_linear_name(model) == "classifier"
    original_last = model.classifier
    insert_vb(model, (3, 32, 32), k=256)
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "features.1.weight", "features.1.bias", "features.3.weight", "features.3.bias",
        "classifier.bottleneck.encoder.weight", "classifier.bottleneck.encoder.bias",
        "classifier.bottleneck.decoder.weight", "classifier.bottleneck.decoder.bias",
        "classifier.layer.weight", "classifier.layer.bias",
    ]
    assert model.classifier.layer is original_last
    vb = model.classifier.bottleneck
    assert vb.feature_shape == (1024,) and vb.k == 256
    assert tuple(model.classifier.bottleneck.encoder.weight.shape) == (512, 1024)
    assert tuple(model.classifier.layer.weight.shape) == (10, 1024)

    # Order of the forward pass: features -> bottleneck -> output layer.
    order = []
    for name, module in [("features", model.features), ("bottleneck", vb), ("layer", model.classifier.layer)]:
        module.register_forward_hook(lambda *_args, name=name: order.append(name))
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert order == ["features", "bottleneck", "layer"]


def test_defense_stack_builds_the_same_layout():
    model = stack_from_cli("precode", precode_k=256, precode_beta=1e-3).build_model(
        {"name": "mlp", "kwargs": {}, "input_shape": [3, 32, 32], "num_classes": 10}
    )
    names = {n for n, _ in model.named_parameters()}
    assert {"classifier.bottleneck.encoder.weight", "classifier.layer.bias"} <= names
    assert "classifier.weight" not in names


def test_insert_vb_unknown_position_is_a_user_error():
    model = models.build(SMALL_MLP)
    with pytest.raises(UserError, match="no_such_layer"):
        insert_vb(model, (3, 8, 8), at="no_such_layer")


def test_kl_is_zero_for_the_standard_normal():
    mean, std = torch.zeros(4, 32), torch.ones(4, 32)
    assert kl_to_standard_normal(mean, std).abs().item() < 1e-6


@pytest.mark.parametrize(
    "mean,std",
    [(0.5, 1.0), (0.0, 0.5), (0.0, 2.0), (-1.0, 0.3)],
)
def test_kl_is_positive_otherwise(mean, std):
    m, s = torch.full((3, 8), mean), torch.full((3, 8), std)
    kl = kl_to_standard_normal(m, s).item()
    expected_nats = 8 * 0.5 * (mean**2 + std**2 - 2 * math.log(std) - 1)
    assert kl > 1e-3
    assert kl == pytest.approx(expected_nats / math.log(2), rel=1e-5)  # bits, summed over latents


def test_vb_loss_is_beta_times_kl():
    torch.manual_seed(1)
    model = insert_vb(models.build(SMALL_MLP), (3, 8, 8), k=16, beta=0.25)
    with pytest.raises(RuntimeError):
        vb_loss(model)  # no forward pass yet
    model(torch.randn(4, 3, 8, 8))
    vb = model.classifier.bottleneck
    assert vb.last_kl is not None and vb.last_kl.item() > 0
    assert torch.allclose(vb_loss(model), 0.25 * vb.last_kl)


def test_client_loss_is_cross_entropy_plus_beta_kl():
    torch.manual_seed(2)
    beta = 0.01
    stack = stack_from_cli("precode", precode_k=16, precode_beta=beta)
    model = stack.build_model(SMALL_MLP)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = model(x)
    kl = model.classifier.bottleneck.last_kl
    loss = stack.loss(model, logits, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y) + beta * kl)
    assert (loss - F.cross_entropy(logits, y)).item() > 0
    assert stack.loss_spec()["includes_vb_kl"] is True

    plain = stack_from_cli("none")
    plain_model = plain.build_model(SMALL_MLP)
    plain_logits = plain_model(x)
    assert torch.equal(plain.loss(plain_model, plain_logits, y), F.cross_entropy(plain_logits, y))
    assert plain.loss_spec()["includes_vb_kl"] is False


def test_defense_specs_round_trip():
    stack = stack_from_cli("precode", precode_k=64, precode_beta=0.5)
    specs = stack.specs()
    assert specs == [{"name": "precode", "params": {"k": 64, "beta": 0.5, "at": None}}]
    model = stack.build_model(SMALL_MLP)
    assert stack.specs()[0]["params"]["at"] == "classifier"  # resolved at build time
    rebuilt = DefenseStack.from_specs(stack.specs())
    again = rebuilt.build_model(SMALL_MLP)
    assert [n for n, _ in again.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert stack_from_cli("none").specs() == []
    assert set(REGISTRY) >= {"none", "precode"}


def test_precode_rejects_bad_parameters():
    with pytest.raises(UserError, match="precode-k"):
        Precode(k=0)
    with pytest.raises(UserError, match="precode-beta"):
        Precode(beta=-1.0)
    with pytest.raises(UserError, match="unknown defense"):
        DefenseStack.from_specs([{"name": "nope", "params": {}}])
