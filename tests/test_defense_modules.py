"""The gradient defenses of issue 5 (noise, prune, soteria, ppp): each changes the shared gradient as it claims."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses import DefenseStack
from defenses.noise import GaussianNoise, NoiseDefense
from defenses.ppp import PartialPerturbation
from defenses.prune import GradientPruning, kept_count
from defenses.soteria import Soteria, pruned_count
from precode_cli.errors import UserError

SMALL_MLP = {"name": "mlp", "kwargs": {"width": 32}, "input_shape": [3, 8, 8], "num_classes": 5}
SHAPE = (3, 4, 4)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 5))


def client_gradient(stack: DefenseStack, model: nn.Module, batch: int = 4, seed: int = 0, recorder=None):
    """What capture does: forward, stack loss, grads by name (optionally inside soteria's recording)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=gen)
    y = torch.randint(0, 5, (batch,), generator=gen)
    names_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    torch.manual_seed(seed)  # the VB's sample
    if recorder is None:
        loss = stack.loss(model, model(x), y)
    else:
        with recorder.recording():
            loss = stack.loss(model, model(x), y)
    grads = torch.autograd.grad(loss, [p for _, p in names_params])
    return {n: g for (n, _), g in zip(names_params, grads)}


# ---------------------------------------------------------------- noise

def test_gaussian_noise_has_the_scale_and_is_seeded():
    grads = {"a": torch.randn(400, 500), "b": torch.zeros(3)}
    defense = NoiseDefense(scale=0.05)
    out = defense.perturb_gradients(grads, torch.Generator().manual_seed(1))
    diff = out["a"] - grads["a"]
    assert abs(diff.std().item() - 0.05) < 0.05 * 0.02
    assert abs(diff.mean().item()) < 1e-3
    again = defense.perturb_gradients(grads, torch.Generator().manual_seed(1))
    assert all(torch.equal(out[n], again[n]) for n in grads)
    other = defense.perturb_gradients(grads, torch.Generator().manual_seed(2))
    assert not torch.equal(out["a"], other["a"])
    assert GaussianNoise is NoiseDefense and defense.name == "noise"


def test_laplace_noise_mean_absolute_deviation_is_the_scale():
    grads = {"a": torch.randn(400, 500)}
    defense = NoiseDefense(scale=0.2, distribution="laplace")
    diff = defense.perturb_gradients(grads, torch.Generator().manual_seed(3))["a"] - grads["a"]
    assert abs(diff.abs().mean().item() - 0.2) < 0.2 * 0.02
    assert abs(diff.std().item() - 0.2 * math.sqrt(2)) < 0.2 * math.sqrt(2) * 0.03
    # heavier tails than a Gaussian of the same std: excess kurtosis about 3
    kurt = ((diff - diff.mean()) ** 4).mean() / diff.var() ** 2 - 3
    assert 2.0 < kurt.item() < 4.0


# ---------------------------------------------------------------- prune

@pytest.mark.parametrize("keep", [0.1, 0.37, 0.5, 1.0])
def test_prune_keeps_exactly_the_largest_fraction_per_tensor(keep):
    gen = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(30, 17, generator=gen) * 100, "b": torch.randn(17, generator=gen) * 1e-4}
    out = GradientPruning(keep=keep).perturb_gradients(grads, gen)
    for name, grad in grads.items():
        kept = out[name] != 0
        count = math.ceil(keep * grad.numel() - 1e-9)
        assert kept.sum().item() == count == kept_count(grad.numel(), keep)
        assert torch.equal(out[name][kept], grad[kept])
        if count < grad.numel():
            assert grad[kept].abs().min() >= grad[~kept].abs().max()


def test_prune_keeps_at_least_one_entry():
    out = GradientPruning(keep=1e-6).perturb_gradients({"w": torch.tensor([1.0, -5.0, 2.0])}, torch.Generator())
    assert torch.equal(out["w"], torch.tensor([0.0, -5.0, 0.0]))


# ---------------------------------------------------------------- ppp

def test_ppp_default_set_is_everything_before_the_decoder():
    defense = PartialPerturbation(k=8, clip=1.0, sigma=0.0)
    model = defense.apply_to_model(tiny_model(), SHAPE)
    assert defense.at == "5"
    assert defense.perturbed == ["1.weight", "1.bias", "3.weight", "3.bias",
                                 "5.bottleneck.encoder.weight", "5.bottleneck.encoder.bias"]
    assert {n for n, _ in model.named_parameters()} - set(defense.perturbed) == {
        "5.bottleneck.decoder.weight", "5.bottleneck.decoder.bias", "5.layer.weight", "5.layer.bias"}


@pytest.mark.parametrize("clip", [1e-3, 1e3])
def test_ppp_clips_jointly_without_noise_and_leaves_the_rest_bit_identical(clip):
    defense = PartialPerturbation(k=8, clip=clip, sigma=0.0)
    stack = DefenseStack([defense])
    model = defense.apply_to_model(tiny_model(), SHAPE)
    grads = client_gradient(stack, model)
    out = stack.perturb_gradients(grads, torch.Generator().manual_seed(0))
    chosen = defense.perturbed
    norm = torch.linalg.vector_norm(torch.cat([grads[n].flatten() for n in chosen]))
    new_norm = torch.linalg.vector_norm(torch.cat([out[n].flatten() for n in chosen]))
    assert math.isclose(new_norm.item(), min(norm.item(), clip), rel_tol=1e-5)
    for n in chosen:  # clipping is a common rescaling
        assert torch.allclose(out[n], grads[n] * (min(norm.item(), clip) / norm.item()), rtol=1e-5, atol=1e-12)
    for n in set(grads) - set(chosen):
        assert torch.equal(out[n], grads[n])


def test_ppp_noise_has_std_sigma_times_clip_only_on_the_chosen_parameters():
    defense = PartialPerturbation(k=64, clip=0.5, sigma=2.0)
    model = defense.apply_to_model(nn.Sequential(nn.Flatten(), nn.Linear(48, 200), nn.ReLU(), nn.Linear(200, 5)), SHAPE)
    stack = DefenseStack([defense])
    grads = client_gradient(stack, model)
    out = stack.perturb_gradients(grads, torch.Generator().manual_seed(0))
    again = stack.perturb_gradients(grads, torch.Generator().manual_seed(0))
    chosen = defense.perturbed
    norm = torch.linalg.vector_norm(torch.cat([grads[n].flatten() for n in chosen])).item()
    factor = min(1.0, 0.5 / norm)
    noise = torch.cat([(out[n] - grads[n] * factor).flatten() for n in chosen])
    assert noise.numel() > 10000
    assert abs(noise.std().item() - 1.0) < 0.03
    assert all(torch.equal(out[n], again[n]) for n in grads)
    for n in set(grads) - set(chosen):
        assert torch.equal(out[n], grads[n])


def test_ppp_named_params_and_precode_loss():
    defense = PartialPerturbation(k=8, clip=1e-4, sigma=0.0, params=["3.weight"])
    model = defense.apply_to_model(tiny_model(), SHAPE)
    stack = DefenseStack([defense])
    assert stack.loss_spec()["includes_vb_kl"]
    grads = client_gradient(stack, model)
    out = stack.perturb_gradients(grads, torch.Generator())
    assert math.isclose(out["3.weight"].norm().item(), 1e-4, rel_tol=1e-5)
    assert all(torch.equal(out[n], grads[n]) for n in grads if n != "3.weight")
    with pytest.raises(UserError, match="--ppp-params"):
        PartialPerturbation(params=["nope.weight"]).apply_to_model(tiny_model(), SHAPE)


# ---------------------------------------------------------------- soteria

@pytest.mark.parametrize("percent", [1.0, 25.0, 50.0])
def test_soteria_zeroes_the_documented_fraction_of_columns(percent):
    defense = Soteria(percent=percent)
    stack = DefenseStack([defense])
    model = defense.apply_to_model(tiny_model(), SHAPE)
    grads = client_gradient(stack, model, recorder=defense)
    out = stack.perturb_gradients(grads, torch.Generator())
    w, new = grads["5.weight"], out["5.weight"]
    pruned = torch.zeros(20, dtype=torch.bool)
    pruned[defense.last_pruned] = True
    assert pruned.sum().item() == pruned_count(20, percent) == max(1, round(percent / 100 * 20))
    assert (new[:, pruned] == 0).all() and (w[:, pruned] != 0).any()  # the pruned columns (some were non-zero)
    assert torch.equal(new[:, ~pruned], w[:, ~pruned])
    assert all(torch.equal(out[n], grads[n]) for n in grads if n != "5.weight")
    with pytest.raises(RuntimeError, match="recording"):  # the mask is used once
        stack.perturb_gradients(grads, torch.Generator())


def test_soteria_prunes_the_features_of_largest_r_over_dr_dx():
    # r = relu(A x) with known d r_i/d x = A_i where active; score_i = sum_b ||A_i|| / r_{b,i}
    torch.manual_seed(0)
    first = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0],
                                         [0, 0, 0, 1.0, 0, 0]]) * torch.tensor([[1.0], [0.1], [1.0], [1.0]]))
    model = nn.Sequential(first, nn.Linear(4, 3))
    defense = Soteria(percent=25.0, layer="1")
    model = defense.apply_to_model(model, (6,))
    x = torch.tensor([[1.0, 1.0, 1.0, 10.0, 0, 0], [2.0, 1.0, 1.0, 10.0, 0, 0]])
    with defense.recording():
        loss = DefenseStack([defense]).loss(model, model(x), torch.tensor([0, 1]))
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    out = defense.perturb_gradients(grads, torch.Generator())
    # scores: f0 = 1/1 + 1/2, f1 = 0.1/0.1 * 2 = 2, f2 = 2, f3 = 1/10 * 2 = 0.2 -> f3 pruned
    assert (out["1.weight"][:, 3] == 0).all() and (out["1.weight"][:, :3] == grads["1.weight"][:, :3]).all()


def authors_gs_mask(model: nn.Module, layer: nn.Module, x: torch.Tensor, percent: float):
    """The GS script's rule (Soteria repository, GS_attack/reconstruct_image.py), written out as they do:
    one backward pass per feature, divided by r + 0.1, numpy's percentile, pruned below it."""
    import numpy as np
    kept = {}
    hook = layer.register_forward_pre_hook(lambda _m, args: kept.update(r=args[0]))
    x = x.clone().requires_grad_(True)
    model(x)
    hook.remove()
    r = kept["r"]
    norms = torch.zeros_like(r)
    for f in range(r.shape[1]):
        target = torch.zeros_like(r)
        target[:, f] = 1
        (dx,) = torch.autograd.grad(r, x, target, retain_graph=True)
        norms[:, f] = torch.norm(dx.view(dx.shape[0], -1), dim=1) / (r.detach()[:, f] + 0.1)
    total = norms.sum(dim=0).numpy()
    threshold = np.percentile(total, percent)
    return np.where(abs(total) < threshold, 0, 1), r.detach()


@pytest.mark.parametrize("percent", [10.0, 30.0, 60.0])
def test_soteria_gs_rule_is_the_authors_gs_script_and_dead_features_count_in_its_percent(percent):
    model = tiny_model()
    with torch.no_grad():
        model[3].bias[:8] = -100.0  # 8 of the 20 features of layer 5's input are dead ReLUs, the others live
        model[3].bias[8:] = 3.0
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, *SHAPE, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    expected, r = authors_gs_mask(model, model[5], x, percent)
    assert (r[:, :8] == 0).all() and (r[:, 8:] != 0).any(dim=0).all()
    results = {}
    for rule in ("gs", "count"):
        defense = Soteria(percent=percent, layer="5", rule=rule)
        stack = DefenseStack([defense])
        wrapped = defense.apply_to_model(tiny_model(), SHAPE)
        wrapped.load_state_dict(model.state_dict())
        with defense.recording():
            loss = stack.loss(wrapped, wrapped(x), y)
        grads = dict(zip([n for n, _ in wrapped.named_parameters()],
                         torch.autograd.grad(loss, list(wrapped.parameters()))))
        out = stack.perturb_gradients(grads, torch.Generator())
        results[rule] = set(defense.last_pruned)
        assert (out["5.weight"][:, defense.last_pruned] == 0).all()
    assert results["gs"] == {i for i in range(20) if expected[i] == 0}
    live_pruned = {rule: len(pruned - set(range(8))) for rule, pruned in results.items()}
    assert live_pruned["count"] == pruned_count(20, percent)  # count: the percent, live features first
    if percent <= 8 / 20 * 100:  # gs: the dead features fill its percentile; it prunes no live one
        assert live_pruned["gs"] == 0
    else:
        assert 0 < live_pruned["gs"] < live_pruned["count"]


def test_soteria_rule_is_checked_and_recorded():
    assert Soteria(rule="gs").params()["rule"] == "gs" and Soteria().params()["rule"] == "count"
    with pytest.raises(UserError, match="--soteria-rule must be one of count, gs"):
        Soteria(rule="notebook")


def test_soteria_is_idle_outside_recording_and_finds_the_layer_behind_precode():
    from defenses.precode import Precode
    soteria, precode = Soteria(percent=50.0), Precode(k=8)
    model = precode.apply_to_model(soteria.apply_to_model(tiny_model(), SHAPE), SHAPE)
    stack = DefenseStack([precode, soteria])
    plain = client_gradient(stack, model)  # no recording: training / attacks
    with pytest.raises(RuntimeError, match="recording"):
        stack.perturb_gradients(plain, torch.Generator())
    grads = client_gradient(stack, model, recorder=soteria)
    out = stack.perturb_gradients(grads, torch.Generator())
    assert torch.equal(grads["5.layer.weight"], plain["5.layer.weight"])  # recording changes nothing itself
    assert len(soteria.last_pruned) == 10 and (out["5.layer.weight"][:, soteria.last_pruned] == 0).all()
    assert all(torch.equal(out[n], grads[n]) for n in grads if n != "5.layer.weight")


def test_soteria_on_the_project_mlp():
    from precode_cli import models
    defense = Soteria(percent=10.0)
    model = defense.apply_to_model(models.build(SMALL_MLP), tuple(SMALL_MLP["input_shape"]))
    x, y = torch.randn(2, *SMALL_MLP["input_shape"]), torch.tensor([0, 1])
    with defense.recording():
        loss = F.cross_entropy(model(x), y)
        defense.loss_term(model)
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))
    out = defense.perturb_gradients(grads, torch.Generator())
    changed = [n for n in names if not torch.equal(out[n], grads[n])]
    assert len(changed) == 1 and changed[0].endswith(".weight")


# ---------------------------------------------------------------- params and validation

@pytest.mark.parametrize("defense", [
    NoiseDefense(), NoiseDefense(scale=0.3, distribution="laplace"), GradientPruning(), GradientPruning(keep=0.25),
    Soteria(), Soteria(percent=40, layer="fc"), Soteria(percent=5, rule="gs"), PartialPerturbation(),
    PartialPerturbation(k=4, beta=0.1, at="fc", clip=2.0, sigma=0.0, params=["a.weight"]),
])
def test_params_round_trip(defense):
    rebuilt = type(defense)(**defense.params())
    assert rebuilt.params() == defense.params()
    spec = DefenseStack([defense]).specs()[0]
    assert set(spec) == {"name", "params"} and spec["name"] == defense.name


@pytest.mark.parametrize("build, option", [
    (lambda: NoiseDefense(scale=0), "--noise-scale"),
    (lambda: NoiseDefense(scale=-1), "--noise-scale"),
    (lambda: NoiseDefense(scale=float("nan")), "--noise-scale"),
    (lambda: NoiseDefense(scale="x"), "--noise-scale"),
    (lambda: NoiseDefense(distribution="uniform"), "--noise-distribution"),
    (lambda: GradientPruning(keep=0), "--prune-keep"),
    (lambda: GradientPruning(keep=1.5), "--prune-keep"),
    (lambda: Soteria(percent=0), "--soteria-percent"),
    (lambda: Soteria(percent=101), "--soteria-percent"),
    (lambda: Soteria(layer=""), "--soteria-layer"),
    (lambda: Soteria(layer="0").apply_to_model(tiny_model(), SHAPE), "--soteria-layer"),
    (lambda: PartialPerturbation(clip=0), "--ppp-clip"),
    (lambda: PartialPerturbation(sigma=-0.1), "--ppp-sigma"),
    (lambda: PartialPerturbation(params=[]), "--ppp-params"),
    (lambda: PartialPerturbation(k=0), "--precode-k"),
])
def test_bad_parameters_are_user_errors(build, option):
    with pytest.raises(UserError, match=option):
        build()
