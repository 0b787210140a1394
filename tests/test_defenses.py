"""The defense suite end to end: each defense changes what a client shares the way it claims.

Everything here goes through `DefenseStack.client_gradients` (what training and capture both call)
or through the CLI, and compares with a known answer: the undefended client's gradient for the same
weights and inputs, an independent per-example loop for DP-SGD, Opacus's accountant used directly.
The defense modules' own hooks are unit-tested in test_defense_modules.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from defenses import DefenseStack, stack_from_cli
from defenses.dp import epsilon
from defenses.precode import Precode
from defenses.soteria import pruned_count
from helpers import DUMP0, invoke_ok
from precode_cli import data, fileformat, models, training
from precode_cli.errors import UserError

SHAPE = (1, 8, 8)
CLASSES = 10
Grads = dict[str, torch.Tensor]


def mlp(stack: DefenseStack, width: int = 16, seed: int = 0) -> nn.Module:
    """The project's MLP on 1x8x8 inputs with the stack's changes, fixed weights for a fixed seed."""
    torch.manual_seed(seed)
    return stack.build_model(models.make_spec("mlp", SHAPE, CLASSES, width=width))


def batch(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and labels, independent of the global RNG (which PRECODE's sample uses)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, *SHAPE, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)


def shared(stack: DefenseStack, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
           seed: int = 0, global_seed: int = 0) -> Grads:
    """What the client shares; the global seed fixes PRECODE's sample so two stacks see the same pass."""
    torch.manual_seed(global_seed)
    return stack.client_gradients(model, x, y, torch.Generator().manual_seed(seed)).grads


def assert_same_keys(a: Grads, b: Grads) -> None:
    """A defense must not drop, add or reorder tensors: dumps and the optimiser match them by name."""
    assert list(a) == list(b), "a defense must share a gradient for every parameter, in model order"


# ---------------------------------------------------------------- noise


def test_gaussian_noise_on_the_shared_gradient_has_std_scale_and_follows_the_seed() -> None:
    """Noise of the documented size, and the capture seed reproduces a dump exactly."""
    scale = 0.03
    stack = stack_from_cli(["noise"], noise_scale=scale)
    model = mlp(DefenseStack([]), width=256)
    x, y = batch(8)
    plain = shared(DefenseStack([]), model, x, y)
    noisy = shared(stack, model, x, y, seed=5)
    assert_same_keys(plain, noisy)
    diff = torch.cat([(noisy[n] - plain[n]).flatten() for n in plain])
    assert diff.numel() > 80_000
    assert abs(diff.std().item() - scale) < 0.02 * scale
    assert abs(diff.mean().item()) < 0.01 * scale
    assert all((noisy[n] != plain[n]).float().mean() > 0.99 for n in plain)  # every tensor, not just one
    again = shared(stack, model, x, y, seed=5)
    assert all(torch.equal(noisy[n], again[n]) for n in plain)
    other = shared(stack, model, x, y, seed=6)
    assert not torch.equal(noisy["features.1.weight"], other["features.1.weight"])


def test_laplace_noise_on_the_shared_gradient_has_mean_absolute_deviation_scale() -> None:
    """Laplace's scale b is its mean absolute deviation (its std is sqrt(2) b, which tells it from a Gaussian)."""
    scale = 0.2
    model = mlp(DefenseStack([]), width=256)
    x, y = batch(8)
    plain = shared(DefenseStack([]), model, x, y)
    noisy = shared(stack_from_cli(["noise"], noise_scale=scale, noise_distribution="laplace"), model, x, y, seed=1)
    diff = torch.cat([(noisy[n] - plain[n]).flatten() for n in plain])
    assert abs(diff.abs().mean().item() - scale) < 0.02 * scale
    assert abs(diff.std().item() - math.sqrt(2) * scale) < 0.03 * math.sqrt(2) * scale


# ---------------------------------------------------------------- prune


@pytest.mark.parametrize("keep", [0.05, 0.3])
def test_prune_shares_exactly_the_largest_entries_of_each_plain_tensor(keep: float) -> None:
    """Per tensor: ceil(keep * numel) survivors, equal to the plain gradient there, none smaller than a dropped one."""
    model = mlp(DefenseStack([]), width=32)
    x, y = batch(16)
    plain = shared(DefenseStack([]), model, x, y)
    pruned = shared(stack_from_cli(["prune"], prune_keep=keep), model, x, y)
    assert_same_keys(plain, pruned)
    for name, grad in plain.items():
        count = math.ceil(keep * grad.numel())
        assert (grad != 0).sum() >= count, "the check needs enough non-zero plain entries"
        kept = pruned[name] != 0
        assert kept.sum().item() == count, name
        assert torch.equal(pruned[name][kept], grad[kept])
        if count < grad.numel():
            assert grad[kept].abs().min() >= grad[~kept].abs().max(), name


# ---------------------------------------------------------------- dp


def per_example_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float,
                     extra_loss=None) -> tuple[Grads, torch.Tensor]:
    """Abadi et al.'s step without noise, one example at a time: sum of clipped gradients, and the norms.

    Written independently of defenses.dp: plain autograd on a batch of one, joint L2 norm over all parameters.
    """
    named = [(n, p) for n, p in model.named_parameters()]
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    norms = []
    for i in range(len(x)):
        logits = model(x[i : i + 1])
        loss = F.cross_entropy(logits, y[i : i + 1])
        if extra_loss is not None:
            loss = loss + extra_loss()
        grads = torch.autograd.grad(loss, [p for _, p in named])
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / norm.item())
        for (n, _), g in zip(named, grads):
            total[n] += g.double() * factor
    return total, torch.stack(norms)


def test_dp_equals_an_independent_per_example_clipping_loop() -> None:
    """With (almost) no noise, DP-SGD's shared gradient is mean of per-example gradients clipped to C."""
    model = mlp(DefenseStack([]), width=16)
    x, y = batch(12)
    _, norms = per_example_loop(model, x, y, clip=math.inf)
    clip = norms.median().item()  # some examples are clipped, some are not
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    expected, loop_norms = per_example_loop(model, x, y, clip=clip)
    stack = stack_from_cli(["dp"], dp_clip=clip, dp_sigma=1e-12)
    step = stack.client_gradients(model, x, y, torch.Generator().manual_seed(0))
    assert list(step.grads) == [n for n, _ in model.named_parameters()]
    for name, total in expected.items():
        assert step.grads[name].dtype == torch.float32
        assert torch.allclose(step.grads[name].double(), total / len(x), rtol=1e-4, atol=1e-5), name
    dp = stack.defenses[0]
    assert torch.allclose(dp.last_norms.double(), loop_norms, rtol=1e-5)
    # the loss and logits reported for the step are the batch's, as training's history expects
    logits = model(x)
    assert torch.allclose(step.logits, logits.detach(), atol=1e-5)
    assert math.isclose(step.loss.item(), F.cross_entropy(logits, y).item(), rel_tol=1e-5)


def test_dp_noise_has_std_sigma_times_clip_on_the_sum() -> None:
    """N(0, (sigma C)^2) is added to the sum of clipped gradients, before dividing by B."""
    clip, sigma, size = 0.5, 3.0, 6
    model = mlp(DefenseStack([]), width=64)
    x, y = batch(size)
    expected, _ = per_example_loop(model, x, y, clip=clip)
    stack = stack_from_cli(["dp"], dp_clip=clip, dp_sigma=sigma)
    got = stack.client_gradients(model, x, y, torch.Generator().manual_seed(3)).grads
    noise = torch.cat([(got[n].double() * size - expected[n]).flatten() for n in expected])
    assert noise.numel() > 8000
    assert abs(noise.std().item() - sigma * clip) < 0.03 * sigma * clip
    assert abs(noise.mean().item()) < 0.05 * sigma * clip
    again = stack.client_gradients(model, x, y, torch.Generator().manual_seed(3)).grads
    assert all(torch.equal(got[n], again[n]) for n in got)


def test_dp_refuses_batchnorm_and_takes_groupnorm() -> None:
    """A per-example gradient is undefined when BatchNorm mixes the examples of a batch."""
    with pytest.raises(UserError, match="BatchNorm"):
        stack_from_cli(["dp"]).build_model(models.make_spec("resnet18", (3, 32, 32), 10))
    model = stack_from_cli(["dp"]).build_model(models.make_spec("resnet18", (3, 32, 32), 10, norm="group"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _kl_bits(stats: torch.Tensor, k: int) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, I)) in bits of one VB pass, from its encoder's output (PRECODE's formula)."""
    mean, std = stats[:, :k], F.softplus(stats[:, k:])
    return (0.5 * (mean**2 + std**2 - 2 * torch.log(std + 1e-12) - 1).sum(1)).mean() / math.log(2)


def test_dp_with_precode_clips_per_example_gradients_of_the_vb_loss() -> None:
    """dp + precode: each example's gradient includes its own beta * KL and its own VB sample."""
    k, beta = 8, 0.1
    stack = stack_from_cli(["precode", "dp"], precode_k=k, precode_beta=beta, dp_clip=0.3, dp_sigma=1e-12)
    model = mlp(stack, width=16)
    vb = model.classifier.bottleneck
    with torch.no_grad():  # std = softplus(-30), about 1e-13: the sample is its mean, so a loop can reproduce it
        vb.encoder.bias[k:] = -30.0
    captured: dict[str, torch.Tensor] = {}
    hook = vb.encoder.register_forward_hook(lambda _m, _i, out: captured.__setitem__("stats", out))
    x, y = batch(6)
    vb_term = lambda: beta * _kl_bits(captured["stats"], k)  # noqa: E731
    expected, loop_norms = per_example_loop(model, x, y, clip=0.3, extra_loss=vb_term)
    hook.remove()
    step = stack.client_gradients(model, x, y, torch.Generator().manual_seed(0))
    assert set(step.grads) == set(expected) and "classifier.bottleneck.encoder.weight" in step.grads
    for name, total in expected.items():
        assert torch.allclose(step.grads[name].double(), total / len(x), rtol=1e-4, atol=1e-5), name
    assert torch.allclose(stack.defenses[1].last_norms.double(), loop_norms, rtol=1e-4)


def test_dp_with_precode_draws_a_fresh_vb_sample_for_every_example() -> None:
    """Two copies of one example get different per-example gradients (their own VB noise), seeded globally."""
    stack = stack_from_cli(["precode", "dp"], precode_k=8, dp_clip=1.0, dp_sigma=1.0)
    model = mlp(stack, width=16)
    x, y = batch(1)
    x, y = x.repeat(4, 1, 1, 1), y.repeat(4)
    first = shared(stack, model, x, y, global_seed=7)
    norms = stack.defenses[1].last_norms.clone()
    assert torch.unique(norms).numel() == 4
    again = shared(stack, model, x, y, global_seed=7)
    assert torch.equal(stack.defenses[1].last_norms, norms)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert all(torch.isfinite(g).all() for g in first.values())


# ---------------------------------------------------------------- ppp


def test_ppp_perturbs_only_the_layers_before_the_sample() -> None:
    """Against the PRECODE client with the same VB sample: only the set in front of the decoder changes."""
    clip = 1e-3
    stack = stack_from_cli(["ppp"], precode_k=8, ppp_clip=clip, ppp_sigma=1e-12)
    model = mlp(stack, width=16)
    ppp = stack.defenses[0]
    assert ppp.perturbed == ["features.1.weight", "features.1.bias", "features.3.weight", "features.3.bias",
                             "classifier.bottleneck.encoder.weight", "classifier.bottleneck.encoder.bias"]
    x, y = batch(8)
    precode = DefenseStack([Precode(k=8, at=ppp.at)])
    plain = shared(precode, model, x, y, global_seed=3)
    got = shared(stack, model, x, y, global_seed=3)
    assert_same_keys(plain, got)
    for name in set(plain) - set(ppp.perturbed):
        assert torch.equal(got[name], plain[name]), name
    assert all(not torch.equal(got[n], plain[n]) for n in ppp.perturbed)
    before = torch.linalg.vector_norm(torch.cat([plain[n].flatten() for n in ppp.perturbed])).item()
    after = torch.linalg.vector_norm(torch.cat([got[n].flatten() for n in ppp.perturbed])).item()
    assert before > clip and after <= clip * (1 + 1e-5)
    assert math.isclose(after, clip, rel_tol=1e-4)
    for name in ppp.perturbed:  # clipping rescales, it does not turn the gradient
        assert torch.allclose(got[name], plain[name] * (clip / before), rtol=1e-4, atol=1e-12)


def test_ppp_noise_changes_the_perturbed_set_by_sigma_times_clip() -> None:
    """Unclipped (clip above the norm), the difference is the noise alone: std sigma * clip."""
    clip, sigma = 1e3, 1e-3
    stack = stack_from_cli(["ppp"], precode_k=8, ppp_clip=clip, ppp_sigma=sigma)
    model = mlp(stack, width=64)
    ppp = stack.defenses[0]
    x, y = batch(8)
    plain = shared(DefenseStack([Precode(k=8, at=ppp.at)]), model, x, y, global_seed=4)
    got = shared(stack, model, x, y, global_seed=4)
    noise = torch.cat([(got[n] - plain[n]).flatten() for n in ppp.perturbed])
    assert noise.numel() > 4000
    assert abs(noise.std().item() - sigma * clip) < 0.03 * sigma * clip


# ---------------------------------------------------------------- soteria


@pytest.mark.parametrize("percent", [10.0, 50.0])
def test_soteria_zeroes_the_expected_columns_of_the_output_layer_only(percent: float) -> None:
    """round(percent% of F) representation columns of the last Linear's weight gradient, nothing else."""
    width = 32
    stack = stack_from_cli(["soteria"], soteria_percent=percent)
    model = mlp(stack, width=width)
    x, y = batch(8)
    plain = shared(DefenseStack([]), model, x, y)  # soteria's hooks are idle outside its recording
    got = shared(stack, model, x, y)
    assert_same_keys(plain, got)
    for name in plain:
        if name != "classifier.weight":
            assert torch.equal(got[name], plain[name]), name
    weight, plain_weight = got["classifier.weight"], plain["classifier.weight"]
    zero = (weight == 0).all(dim=0)
    newly = zero & ~(plain_weight == 0).all(dim=0)
    expected = round(percent / 100 * width)
    assert newly.sum().item() == expected == pruned_count(width, percent)
    assert sorted(newly.nonzero().flatten().tolist()) == sorted(stack.defenses[0].last_pruned)
    assert torch.equal(weight[:, ~zero], plain_weight[:, ~zero])


def test_soteria_with_precode_prunes_the_layer_behind_the_vb() -> None:
    """precode + soteria: the column mask lands on classifier.layer.weight, the rest equals PRECODE's gradient."""
    stack = stack_from_cli(["precode", "soteria"], precode_k=8, soteria_percent=25.0)
    model = mlp(stack, width=16)
    x, y = batch(8)
    plain = shared(DefenseStack([stack.defenses[0]]), model, x, y, global_seed=2)
    got = shared(stack, model, x, y, global_seed=2)
    changed = [n for n in plain if not torch.equal(got[n], plain[n])]
    assert changed == ["classifier.layer.weight"]
    newly = (got[changed[0]] == 0).all(0) & ~(plain[changed[0]] == 0).all(0)
    assert newly.sum().item() == pruned_count(16, 25.0) == 4  # the VB's output has 16 features


# ---------------------------------------------------------------- the accountant


def test_epsilon_is_opacus_rdp_and_in_the_published_range() -> None:
    """Abadi et al.'s MNIST setting (sigma 1.1, q = 256/60000, 60 epochs, delta 1e-5): Opacus's RDP gives ~2.6."""
    from opacus.accountants import RDPAccountant

    q, steps = 256 / 60000, 60 * 60000 // 256
    eps = epsilon(1.1, q, steps, 1e-5)
    direct = RDPAccountant()
    for _ in range(steps):
        direct.step(noise_multiplier=1.1, sample_rate=q)
    assert abs(eps - direct.get_epsilon(1e-5)) < 1e-9
    assert 2.0 < eps < 3.2
    assert epsilon(1.1, q, steps // 2, 1e-5) < eps < epsilon(1.1, q, steps * 2, 1e-5)
    assert epsilon(2.0, q, steps, 1e-5) < eps < epsilon(0.8, q, steps, 1e-5)
    assert epsilon(1.1, q, steps, 1e-3) < eps  # a looser delta buys a smaller epsilon
    assert epsilon(1.1, q, 0, 1e-5) == 0.0


# ---------------------------------------------------------------- the CLI

TRAIN_SMALL = ["--subset", 40, "--batch-size", 16, "--width", 16, "--image-size", 8, "--seed", 0]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    """A two-epoch DP-SGD run on 40 built-in images: 3 steps per epoch at sampling rate 0.4."""
    run = tmp_path_factory.mktemp("dp") / "run"
    invoke_ok("train", "--defense", "dp", "--dp-sigma", 1.0, "--dp-clip", 0.5, "--dp-delta", 1e-6,
              *TRAIN_SMALL, "--epochs", 2, "--out", run)
    return run


def test_train_with_dp_records_the_accountants_epsilon(dp_run: Path) -> None:
    """history.json and the model file carry epsilon for steps = epochs * ceil(subset / batch), q = batch / subset."""
    steps, rate = 2 * math.ceil(40 / 16), 16 / 40
    expected = epsilon(1.0, rate, steps, 1e-6)
    history = json.loads((dp_run / "history.json").read_text())
    privacy = history["privacy"]
    assert privacy["defense"] == "dp"
    assert privacy["steps"] == steps and math.isclose(privacy["sample_rate"], rate)
    assert privacy["noise_multiplier"] == 1.0 and privacy["delta"] == 1e-6
    assert math.isclose(privacy["epsilon"], expected, rel_tol=1e-12)
    stored = fileformat.read(dp_run / "model.safetensors", "model")
    assert stored.meta["train"]["privacy"] == privacy
    assert stored.meta["defense"] == [{"name": "dp", "params": {"clip": 0.5, "sigma": 1.0, "delta": 1e-6}}]
    assert yaml.safe_load((dp_run / "run.yaml").read_text())["defense"] == stored.meta["defense"]


def test_train_without_dp_records_no_privacy(tmp_path: Path) -> None:
    """Only a defense with a formal guarantee reports one."""
    run = tmp_path / "run"
    invoke_ok("train", "--defense", "noise", *TRAIN_SMALL, "--epochs", 1, "--out", run)
    assert json.loads((run / "history.json").read_text())["privacy"] is None
    assert "privacy" not in fileformat.read(run / "model.safetensors", "model").meta["train"]


def test_capture_from_a_dp_run_shares_the_dp_gradient(dp_run: Path, tmp_path: Path) -> None:
    """Dumps record the run's dp parameters, and hold exactly what the client stack computes with the seed."""
    out = tmp_path / "grads"
    invoke_ok("capture-gradients", dp_run, "--indices", "0:4", "--batch-size", 4, "--seed", 3, "--out", out)
    dump = fileformat.read(out / DUMP0, "gradients")
    assert dump.meta["defense"] == [{"name": "dp", "params": {"clip": 0.5, "sigma": 1.0, "delta": 1e-6}}]
    stored = fileformat.read(dp_run / "model.safetensors", "model")
    stack = DefenseStack.from_specs(stored.meta["defense"])
    model = stack.build_model(stored.meta["model"])
    model.load_state_dict(stored.tensors)
    spec = stored.meta["data"]
    victims = data.load(spec["dataset"], "train", **data.source_of(spec))
    inputs = data.normalize(victims.images[0:4], spec)
    from precode_cli.stages.capture import batch_seed  # each batch's draws: seeded by --seed and its first index

    generator = torch.Generator().manual_seed(batch_seed(3, 0))
    expected = stack.client_gradients(model, inputs, victims.labels[0:4], generator).grads
    for name, grad in expected.items():
        assert torch.allclose(dump.tensors[f"grad.{name}"], grad, rtol=1e-5, atol=1e-7), name


def _defense_of(run: Path) -> list[dict[str, Any]]:
    """The defense list a run's model file records (what capture and attack rebuild)."""
    return fileformat.read(run / "model.safetensors", "model").meta["defense"]


def test_combined_defenses_are_recorded_in_order_whichever_way_they_are_given(tmp_path: Path) -> None:
    """Repeated --defense, the comma form and a --config list give the same stack, precode first."""
    base = ["--width", 16, "--image-size", 8, "--epochs", 0, "--precode-k", 8]
    invoke_ok("train", "--defense", "precode", "--defense", "noise", "--noise-scale", 0.05, *base,
              "--out", tmp_path / "repeated")
    invoke_ok("train", "--defense", "precode,noise", "--noise-scale", 0.05, *base, "--out", tmp_path / "comma")
    config = tmp_path / "defense.yaml"
    config.write_text("defense: [precode, noise]\nnoise_scale: 0.05\n")
    invoke_ok("train", "--config", config, *base, "--out", tmp_path / "config")
    specs = _defense_of(tmp_path / "repeated")
    assert specs == [
        {"name": "precode", "params": {"k": 8, "beta": 0.001, "at": "classifier"}},
        {"name": "noise", "params": {"scale": 0.05, "distribution": "gaussian"}},
    ]
    assert _defense_of(tmp_path / "comma") == specs
    assert _defense_of(tmp_path / "config") == specs
    invoke_ok("train", "--defense", "noise,precode", "--noise-scale", 0.05, *base, "--out", tmp_path / "reversed")
    assert [s["name"] for s in _defense_of(tmp_path / "reversed")] == ["noise", "precode"]
    out = tmp_path / "grads"
    invoke_ok("capture-gradients", tmp_path / "config", "--indices", "0:1", "--out", out)
    dump = fileformat.read(out / DUMP0, "gradients")
    assert dump.meta["defense"] == specs and dump.meta["loss"]["includes_vb_kl"] is True


# ---------------------------------------------------------------- training uses the defense


def test_one_sgd_step_moves_only_the_entries_the_pruned_gradient_keeps() -> None:
    """Training with gradient_fn = the client stack: SGD (lr 1, no momentum) sees the pruned gradient."""
    keep = 0.05
    stack = stack_from_cli(["prune"], prune_keep=keep)
    model = mlp(stack, width=16)
    spec = data.data_spec("builtin", image_size=8, channels=1)
    train_set = data.subset(data.load("builtin", "train", image_size=8, channels=1), 32)
    test_set = data.subset(data.load("builtin", "test", image_size=8, channels=1), 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    used: list[Grads] = []

    def client(*args: Any):
        step = stack.client_gradients(*args)
        used.append({n: g.clone() for n, g in step.grads.items()})
        return step

    config = training.TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=1.0, momentum=0.0)
    training.Trainer(model, stack.loss, train_set, test_set, spec, config, gradient_fn=client).run()
    assert len(used) == 1
    # the same batch in plain autograd, pruned independently: the mask the step must have used
    plain_model = mlp(DefenseStack([]), width=16)
    plain_model.load_state_dict({n: t for n, t in before.items()})
    x = data.normalize(train_set.images, spec)
    plain = shared(DefenseStack([]), plain_model, x, train_set.labels)
    for name, param in model.named_parameters():
        grad = used[0][name]
        moved = param.detach() != before[name]
        assert (grad != 0).sum().item() == math.ceil(keep * grad.numel()), name
        assert torch.equal(moved, grad != 0), name
        assert torch.equal(param.detach()[~moved], before[name][~moved])
        assert torch.allclose(param.detach(), before[name] - grad, atol=1e-6)
        largest = plain[name].abs().flatten().topk(math.ceil(keep * grad.numel())).indices
        assert set(largest.tolist()) == set((grad != 0).flatten().nonzero().flatten().tolist()), name


def test_training_with_noise_is_reproducible_and_really_noisy(tmp_path: Path) -> None:
    """The same seed gives a bit-identical model; without the defense the model is different."""
    args = ["--optimizer", "sgd", "--lr", 0.1, *TRAIN_SMALL, "--epochs", 1]
    for name in ("a", "b"):
        invoke_ok("train", "--defense", "noise", "--noise-scale", 0.5, *args, "--out", tmp_path / name)
    invoke_ok("train", *args, "--out", tmp_path / "plain")
    a, b, plain = (fileformat.read(tmp_path / n / "model.safetensors", "model").tensors for n in ("a", "b", "plain"))
    assert a.keys() == b.keys() == plain.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # SGD applied noise of std 0.5 * lr per step: far more than the plain updates can explain
    assert all(not torch.equal(a[k], plain[k]) for k in a)
    moved = torch.cat([(a[k] - plain[k]).flatten() for k in a])
    assert moved.std().item() > 0.05


# --- end to end: what each defense stops, with known answers -------------------------------------


@pytest.mark.parametrize("defense,stopped", [
    (["--defense", "precode"], False),  # PRECODE leaves the first layer's gradient exact: analytic recovers the image
    (["--defense", "ppp", "--ppp-sigma", "0.1"], True),  # PPP noises exactly that gradient
    (["--defense", "noise", "--noise-scale", "0.1"], True),
    (["--defense", "dp", "--dp-sigma", "1"], True),
])
def test_analytic_attack_through_the_cli_is_stopped_only_by_defenses_that_touch_the_first_layer(
        tmp_path: Path, defense: list[str], stopped: bool) -> None:
    """capture -> attack --method analytic -> evaluate on an untrained MLP, one victim per dump."""
    grads, recon, report = tmp_path / "g", tmp_path / "r", tmp_path / "report"
    invoke_ok("capture-gradients", "--model", "mlp", "--width", 32, *defense, "--indices", "0:2", "--out", grads)
    invoke_ok("attack", grads, "--method", "analytic", "--out", recon)
    invoke_ok("evaluate", recon, "--truth", grads, "--out", report)
    mean_ssim = json.loads((report / "metrics.json").read_text())["summary"]["mean_ssim"]
    if stopped:
        assert mean_ssim < 0.3
    else:
        assert mean_ssim > 0.99
