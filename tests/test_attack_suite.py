"""The Inverting Gradients family end to end: vectorised runs, known answers with and without PRECODE,
the adaptive attacks, restarts, presets, labels of batches, and interrupted runs that resume exactly.

Most tests use a tiny in-memory MLP (Flatten-Linear(192, 32)-ReLU-Linear(32, 10), PRECODE with K=8)
and `AttackTarget`s built directly; the CLI tests use small dumps of `--model mlp --width 32
--image-size 8` captured once for this module. Victims are random images in normalised space, boxed
to [-3, 3]; "pixels" below map that box to [0, 1].
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attacks
import precode_cli
import precode_cli.stages.attack as attack_stage
from attacks.adaptive import AdaptiveInvertingGradients, NoiseInvertingGradients, layers_from_decoder_on
from attacks.base import AttackTarget
from attacks.inverting_gradients import InvertingGradients, resolve_labels
from attacks.labels import labels_from_bias_gradient, mean_softmax_on_noise
from attacks.optimization import RESTART_SEED_STRIDE, MatchingConfig, match_gradients, matched_names
from defenses.precode import insert_vb, vb_loss
from helpers import assert_one_line_error, invoke, invoke_ok, tree_digest, copy_dump
from precode_cli import fileformat, metrics
from precode_cli.cli_support import GracefulStop
from precode_cli.errors import UserError

SHAPE = (3, 8, 8)
LOWER, UPPER = -3.0, 3.0
SMALL = ["--model", "mlp", "--width", 32, "--image-size", 8]  # capture-gradients: a 8x8 MLP of width 32


def plain_loss(_model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def precode_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels) + vb_loss(model)


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 32), nn.ReLU(), nn.Linear(32, 10))


def tiny_precode(at: str | None = None) -> nn.Module:
    return insert_vb(tiny_mlp(), SHAPE, at=at, k=8)


def make_target(model: nn.Module, loss_fn, seed: int, labels: list[int], share_labels: bool = True):
    """The server's view of one client step on random images (seeded); also the true images."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), *SHAPE, generator=generator).clamp(-2.5, 2.5)
    y = torch.tensor(labels, dtype=torch.int64)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss_fn(model, model(x), y), params)  # PRECODE: the client's own noise draw
    target = AttackTarget(
        model=model, loss_fn=loss_fn, param_names=list(names), shared_grads=[g.detach() for g in grads],
        labels=y if share_labels else None, batch_size=len(labels), input_shape=SHAPE, num_classes=10,
        lower=torch.full((1, SHAPE[0], 1, 1), LOWER), upper=torch.full((1, SHAPE[0], 1, 1), UPPER),
    )
    return target, x


def pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x - LOWER) / (UPPER - LOWER)).clamp(0, 1)


def stop_after(calls: int):
    """A `should_stop` that turns true on its (calls + 1)-th call: the engine stops after `calls` steps."""
    count = {"n": 0}

    def should_stop() -> bool:
        count["n"] += 1
        return count["n"] > calls

    return should_stop


def fake_stop(calls: int) -> type[GracefulStop]:
    """A GracefulStop that reports a Ctrl-C from its (calls + 1)-th query on (the stage asks once per chunk
    before it starts, then once per optimisation step), for deterministic interruptions in-process."""

    class FakeStop(GracefulStop):
        def __call__(self) -> bool:
            self.asked = getattr(self, "asked", 0) + 1
            return self.asked > calls

    return FakeStop


def read_recon(path: Path):
    return fileformat.read(path, "reconstruction")


@pytest.fixture(autouse=True)
def _fixed_weights():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """Small dumps captured with the real command (untrained 8x8 MLP of width 32, built-in data).

    plain:  victims 0..3, seed 0 (one set of weights), labels shared
    other:  victims 2, 3 captured with seed 1 (other weights)
    batch:  victims 0..7 in two batches of 4, labels not shared (truth labels [4, 0, 9, 7] and [9, 9, 9, 2])
    """
    root = tmp_path_factory.mktemp("small-grads")
    plans = {
        "plain": [*SMALL, "--indices", "0:4", "--seed", 0],
        "other": [*SMALL, "--indices", "2:4", "--seed", 1],
        "batch": [*SMALL, "--indices", "0:8", "--batch-size", 4, "--no-share-labels", "--seed", 0],
    }
    for name, args in plans.items():
        invoke_ok("capture-gradients", *args, "--out", root / name)
    return {name: root / name for name in plans}


def recon_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


# --- 1. a vectorised run is the same as attacking one by one --------------------------------------


@pytest.mark.parametrize("weights", ["shared", "per-target"])
def test_run_many_equals_one_by_one(weights):
    models = [tiny_mlp()] * 4 if weights == "shared" else [tiny_mlp() for _ in range(4)]
    made = [make_target(model, plain_loss, seed=10 + v, labels=[v + 2]) for v, model in enumerate(models)]
    targets = [t for t, _ in made]
    together = InvertingGradients(iterations=60, lr=0.1).run_many(targets, seed=3)
    for v, target in enumerate(targets):
        alone = InvertingGradients(iterations=60, lr=0.1).run_many([target], seed=3)[0]
        # Signed steps could in principle turn a last-bit difference of the batched matmuls into a
        # different step; on CPU the inputs come out identical, so a tight tolerance is a real check.
        assert torch.allclose(together[v].inputs, alone.inputs, atol=1e-4, rtol=0), v
        assert torch.allclose(together[v].loss_trace, alone.loss_trace, atol=1e-5, rtol=0), v
        assert together[v].labels.tolist() == alone.labels.tolist() == [v + 2]
        assert together[v].label_source == alone.label_source == "dump"
    # The victims really are different problems (a broadcasting slip would make them equal).
    assert not torch.allclose(together[0].inputs, together[1].inputs, atol=1e-2)


@pytest.mark.parametrize("method", [InvertingGradients, AdaptiveInvertingGradients])
def test_run_many_equals_one_by_one_against_precode(method):
    model = tiny_precode()
    targets = [make_target(model, precode_loss, seed=10 + v, labels=[v])[0] for v in range(3)]
    together = method(iterations=30, lr=0.1).run_many(targets, seed=0)
    for v, target in enumerate(targets):
        alone = method(iterations=30, lr=0.1).run_many([target], seed=0)[0]
        assert torch.allclose(together[v].inputs, alone.inputs, atol=1e-4, rtol=0), v


def test_ig_noise_batches_equal_one_by_one_against_precode():
    """ig-noise replaces the sampling by a variable, so it keeps the batched == alone property."""
    model = tiny_precode()
    targets = [make_target(model, precode_loss, seed=10 + v, labels=[v])[0] for v in range(3)]
    together = NoiseInvertingGradients(iterations=30, lr=0.1).run_many(targets, seed=0)
    for v, target in enumerate(targets):
        alone = NoiseInvertingGradients(iterations=30, lr=0.1).run_many([target], seed=0)[0]
        assert torch.allclose(together[v].inputs, alone.inputs, atol=1e-4, rtol=0), v


def test_cli_vectorize_4_equals_vectorize_1(small, tmp_path):
    """Four dumps, two of them with other weights (seed 1), attacked in one chunk or one by one."""
    dumps = [small["plain"] / "train-000000.safetensors", small["plain"] / "train-000001.safetensors",
             small["other"] / "train-000002.safetensors", small["other"] / "train-000003.safetensors"]
    for vectorize in (4, 1):
        invoke_ok("attack", *dumps, "--iterations", 60, "--lr", 0.1, "--vectorize", vectorize, "--seed", 0,
                  "--out", tmp_path / f"v{vectorize}")
    names = [d.name for d in dumps]
    assert [p.name for p in recon_files(tmp_path / "v4")] == names == [p.name for p in recon_files(tmp_path / "v1")]
    for name in names:
        a, b = read_recon(tmp_path / "v4" / name), read_recon(tmp_path / "v1" / name)
        assert torch.allclose(a.tensors["images"], b.tensors["images"], atol=1e-4, rtol=0), name
        assert torch.allclose(a.tensors["loss_trace"], b.tensors["loss_trace"], atol=1e-5, rtol=0), name
        assert torch.equal(a.tensors["labels"], b.tensors["labels"])
        assert a.meta["attack"]["completed"] and a.meta["attack"]["iterations_done"] == 60
    # Same victim under other weights is another problem: the weights really travel per dump.
    same_weights = read_recon(tmp_path / "v4" / names[0]).tensors["images"]
    assert not torch.allclose(same_weights, read_recon(tmp_path / "v4" / names[2]).tensors["images"], atol=1e-2)


# --- 2. known answers: ig, PRECODE, ig-adaptive ----------------------------------------------------

KNOWN_ITERATIONS, KNOWN_LR = 300, 0.1


@pytest.fixture(scope="module")
def precode_runs() -> dict[str, object]:
    """Four victims of one PRECODE model, attacked by ig, ig-adaptive and ig-noise with the same settings."""
    torch.manual_seed(0)
    model = tiny_precode()
    torch.manual_seed(100)  # the client's noise draws
    made = [make_target(model, precode_loss, seed=10 + v, labels=[v]) for v in range(4)]
    targets, truth = [t for t, _ in made], torch.cat([x for _, x in made])
    runs = {"targets": targets, "truth": truth}
    for method in (InvertingGradients, AdaptiveInvertingGradients, NoiseInvertingGradients):
        attack = method(iterations=KNOWN_ITERATIONS, lr=KNOWN_LR)
        results = attack.run_many(targets, seed=0)
        runs[method.name] = (torch.cat([r.inputs for r in results]), attack.last_outcome)
    return runs


def test_ig_recovers_the_victims_of_an_undefended_model():
    model = tiny_mlp()
    made = [make_target(model, plain_loss, seed=10 + v, labels=[v]) for v in range(4)]
    truth = torch.cat([x for _, x in made])
    results = InvertingGradients(iterations=KNOWN_ITERATIONS, lr=KNOWN_LR).run_many([t for t, _ in made], seed=0)
    scores = metrics.per_image(pixels(torch.cat([r.inputs for r in results])), pixels(truth))
    assert scores["ssim"].min() >= 0.9, scores["ssim"]
    assert scores["mse"].mean() <= 5e-3, scores["mse"]
    assert all(r.loss_trace.shape == (KNOWN_ITERATIONS,) and r.loss_trace[-1] < 0.2 for r in results)


def test_precode_stops_ig_but_not_ig_adaptive(precode_runs):
    truth = pixels(precode_runs["truth"])
    ig = metrics.per_image(pixels(precode_runs["ig"][0]), truth)
    adaptive = metrics.per_image(pixels(precode_runs["ig-adaptive"][0]), truth)
    assert adaptive["ssim"].min() >= 0.85, adaptive["ssim"]
    assert adaptive["mse"].mean() <= 1e-2, adaptive["mse"]
    assert ig["mse"].mean() >= 4 * adaptive["mse"].mean(), (ig["mse"], adaptive["mse"])
    assert ig["ssim"].mean() <= adaptive["ssim"].mean() - 0.2, (ig["ssim"], adaptive["ssim"])


def test_first_layer_gradient_of_a_precode_model_still_points_at_the_image(precode_runs):
    """Why ig-adaptive works: for one image, dL/dW1 = delta x^T, every row parallel to the input."""
    for target, x in zip(precode_runs["targets"], precode_runs["truth"]):
        rows = target.shared_grads[target.param_names.index("1.weight")]
        rows = rows[rows.norm(dim=1) > 1e-8]
        assert len(rows) > 0
        cosine = F.cosine_similarity(rows, x.flatten().expand_as(rows), dim=1)
        assert torch.allclose(cosine.abs(), torch.ones_like(cosine), atol=1e-4)


class OutOfOrder(nn.Module):
    """The output layer is declared first; what runs after the decoder is decided by execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 10)
        self.body = nn.Linear(math.prod(SHAPE), 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x.flatten(1))))


def deep_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))


@pytest.mark.parametrize("build, at, ignored, matched", [
    (tiny_mlp, None, ("3.bottleneck.decoder", "3.layer"),
     ["1.weight", "1.bias", "3.bottleneck.encoder.weight", "3.bottleneck.encoder.bias"]),
    (tiny_mlp, "1", ("1.bottleneck.decoder", "1.layer", "3"),
     ["1.bottleneck.encoder.weight", "1.bottleneck.encoder.bias"]),
    (deep_mlp, "3", ("3.bottleneck.decoder", "3.layer", "5"),
     ["1.weight", "1.bias", "3.bottleneck.encoder.weight", "3.bottleneck.encoder.bias"]),
    (OutOfOrder, "body", ("body.bottleneck.decoder", "body.layer", "head"),
     ["body.bottleneck.encoder.weight", "body.bottleneck.encoder.bias"]),
])
def test_ig_adaptive_ignores_the_decoder_and_everything_after_it(build, at, ignored, matched):
    model = insert_vb(build(), SHAPE, at=at, k=8)
    rng = torch.get_rng_state()
    assert layers_from_decoder_on(model, SHAPE) == ignored
    assert torch.equal(torch.get_rng_state(), rng)  # the dry pass leaves the global random state alone
    names = [n for n, _ in model.named_parameters()]
    assert matched_names(names, ignored) == matched
    target = make_target(model, precode_loss, seed=0, labels=[1])[0]
    # The user's own --ignore-layers come first, the automatic ones are added without duplicates.
    user = [matched[0].rsplit(".", 1)[0]] if at is None else []
    config = AdaptiveInvertingGradients(ignore_layers=user + [ignored[0]]).config_for(target)
    assert config.ignore == tuple(user) + ignored
    assert AdaptiveInvertingGradients().params()["ignores_from_decoder_on"] is True


# --- 3. ig-noise, and the refusals without PRECODE ------------------------------------------------


def test_ig_noise_matches_better_than_ig_and_recovers(precode_runs):
    ig_final = precode_runs["ig"][1].traces[:, -1]
    noise_final = precode_runs["ig-noise"][1].traces[:, -1]
    assert (noise_final < ig_final).all(), (noise_final, ig_final)
    assert noise_final.mean() <= 0.1 * ig_final.mean(), (noise_final, ig_final)
    scores = metrics.per_image(pixels(precode_runs["ig-noise"][0]), pixels(precode_runs["truth"]))
    assert scores["ssim"].mean() >= 0.95, scores["ssim"]


def test_ig_noise_optimises_the_noise_sample(precode_runs):
    targets = precode_runs["targets"][:2]
    attack = NoiseInvertingGradients(iterations=40, lr=0.1)
    attack.run_many(targets, seed=0, should_stop=stop_after(0))
    start = attack.last_outcome.state.tensors
    attack.run_many(targets, seed=0, should_stop=stop_after(20))
    later = attack.last_outcome.state.tensors
    assert start["noise.3.bottleneck"].shape == (2, 1, 8)  # [victims x restarts, B, K]
    assert not torch.allclose(start["noise.3.bottleneck"], later["noise.3.bottleneck"], atol=1e-3)
    plain = InvertingGradients(iterations=40)
    plain.run_many(targets, seed=0, should_stop=stop_after(5))
    assert not any(key.startswith("noise.") for key in plain.last_outcome.state.tensors)
    assert NoiseInvertingGradients().params()["optimize_noise"] is True


@pytest.mark.parametrize("method", [NoiseInvertingGradients, AdaptiveInvertingGradients])
def test_adaptive_attacks_refuse_a_model_without_precode(method):
    target = make_target(tiny_mlp(), plain_loss, seed=0, labels=[1])[0]
    with pytest.raises(UserError, match="no PRECODE bottleneck.*--method ig"):
        method(iterations=2).run(target, seed=0)


@pytest.mark.parametrize("method", ["ig-noise", "ig-adaptive"])
def test_cli_refuses_adaptive_attacks_without_precode(small, tmp_path, method):
    result = invoke("attack", small["plain"], "--method", method, "--iterations", 2, "--out", tmp_path / "r")
    assert_one_line_error(result, method, "no PRECODE bottleneck", "--method ig")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# --- 4. restarts ----------------------------------------------------------------------------------


def test_the_restart_with_the_lowest_final_loss_is_kept():
    model = tiny_mlp()
    targets = [make_target(model, plain_loss, seed=20 + v, labels=[v])[0] for v in range(2)]
    seed = 1  # a seed where the two victims' best restarts differ and neither is restart 0
    attack = InvertingGradients(iterations=60, lr=0.1, restarts=3)
    results = attack.run_many(targets, seed=seed)
    losses = attack.last_outcome.restart_losses
    assert losses.shape == (2, 3)
    best = losses.argmin(dim=1)
    assert (best != 0).all() and best[0] != best[1], losses  # otherwise this test would prove little
    for v, target in enumerate(targets):
        assert results[v].loss_trace[-1] == losses[v].min()
        alone = [InvertingGradients(iterations=60, lr=0.1).run_many([target], seed=seed + RESTART_SEED_STRIDE * r)[0]
                 for r in range(3)]
        for r in range(3):  # restart r is the run seeded seed + r * stride, and its loss is reported as such
            assert torch.isclose(alone[r].loss_trace[-1], losses[v, r], atol=1e-5), (v, r)
        assert torch.allclose(results[v].inputs, alone[int(best[v])].inputs, atol=1e-4, rtol=0)
        assert results[v].loss_trace[-1] <= alone[0].loss_trace[-1]  # never worse than restart 0 alone


# --- 5. presets and option errors -----------------------------------------------------------------

COMMON = {"signed": True, "boxed": True, "lr_decay_at": [3 / 8, 5 / 8, 7 / 8], "init": "randn", "restarts": 1,
          "optimize_noise": False, "ignore_layers": [], "distance": "cosine"}


def test_presets_have_the_documented_settings():
    precode = {**COMMON, "iterations": 7000, "lr": 0.01, "tv_weight": 1e-6, "preset": "precode"}
    assert InvertingGradients().params() == precode
    assert InvertingGradients(preset="precode").params() == precode
    assert attacks.create("ig").params() == precode
    assert InvertingGradients(preset="geiping").params() == {
        **COMMON, "iterations": 24_000, "lr": 0.1, "tv_weight": 1e-4, "preset": "geiping"}


def test_explicit_options_override_a_preset():
    params = attacks.create("ig", preset="geiping", iterations=5, tv_weight=0.0, restarts=2, init="zeros",
                            ignore_layers=["3"]).params()
    assert params == {**COMMON, "iterations": 5, "lr": 0.1, "tv_weight": 0.0, "restarts": 2, "init": "zeros",
                      "ignore_layers": ["3"], "preset": "geiping"}
    assert attacks.create("ig-adaptive", preset="geiping", lr=0.5).params()["lr"] == 0.5
    assert attacks.create("ig-noise", preset="geiping").params()["iterations"] == 24_000


def test_cli_records_preset_and_overrides(small, tmp_path):
    dump = small["plain"] / "train-000000.safetensors"
    invoke_ok("attack", dump, "--preset", "geiping", "--iterations", 3, "--restarts", 2, "--init", "zeros",
              "--tv-weight", 0, "--out", tmp_path / "r")
    recon = read_recon(tmp_path / "r" / dump.name)
    assert recon.meta["attack"]["params"] == {**COMMON, "iterations": 3, "lr": 0.1, "tv_weight": 0.0, "restarts": 2,
                                              "init": "zeros", "preset": "geiping"}
    assert recon.tensors["loss_trace"].shape == (3,)


@pytest.mark.parametrize("args, phrases", [
    (["--preset", "cifar"], ["--preset", "'cifar'", "precode, geiping"]),
    (["--init", "gaussian"], ["--init", "'gaussian'", "randn"]),
    (["--method", "dlg", "--preset", "geiping"], ["--preset does not apply to --method dlg"]),
    (["--method", "analytic", "--restarts", 2], ["--restarts does not apply to --method analytic"]),
    (["--method", "analytic", "--iterations", 5], ["--iterations does not apply to --method analytic"]),
    (["--method", "idlg", "--init", "zeros"], ["--init does not apply to --method idlg"]),
])
def test_bad_attack_options_are_one_sentence(small, tmp_path, args, phrases):
    before = tree_digest(small["plain"])
    result = invoke("attack", small["plain"], *args, "--out", tmp_path / "r")  # refused before any work
    assert_one_line_error(result, *phrases)
    assert tree_digest(small["plain"]) == before
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("option", ["--restarts", "--iterations", "--vectorize"])
def test_zero_counts_are_refused(small, tmp_path, option):
    result = invoke("attack", small["plain"], option, 0, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert option in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("option", ["--restarts", "--iterations", "--vectorize"])
def test_zero_counts_are_one_sentence(small, tmp_path, option):
    result = invoke("attack", small["plain"], option, 0, "--out", tmp_path / "r")
    assert_one_line_error(result, option)


def test_ignore_layers_naming_no_parameter_is_refused(small, tmp_path):
    target = make_target(tiny_mlp(), plain_loss, seed=0, labels=[1])[0]
    with pytest.raises(UserError, match="--ignore-layers names 'nope'.*'1.weight'"):
        InvertingGradients(iterations=2, ignore_layers=["nope"]).run(target, seed=0)
    result = invoke("attack", small["plain"], "--ignore-layers", "nope", "--iterations", 2, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: --ignore-layers names 'nope', which has no parameter" in result.stderr
    assert "'features.1.weight'" in result.stderr
    assert not (tmp_path / "r").exists() or not recon_files(tmp_path / "r")


def test_ignore_layers_naming_no_parameter_is_one_sentence(small, tmp_path):
    result = invoke("attack", small["plain"], "--ignore-layers", "nope", "--iterations", 2, "--out", tmp_path / "r")
    assert_one_line_error(result, "--ignore-layers", "'nope'")


# --- 6. labels of a batch -------------------------------------------------------------------------


@pytest.mark.parametrize("defense", ["none", "precode"])
@pytest.mark.parametrize("labels", [[1, 1, 1, 4, 4, 7], [7, 4, 1, 4, 1, 1], [0, 0, 0, 0, 0, 0], [9, 9, 2, 2, 2, 2],
                                    [2, 3, 5, 7, 8, 9]])
def test_batch_labels_with_repeats_are_recovered(defense, labels):
    model, loss_fn = (tiny_mlp(), plain_loss) if defense == "none" else (tiny_precode(), precode_loss)
    target, _x = make_target(model, loss_fn, seed=5, labels=labels, share_labels=False)
    bias_grad = target.shared_grads[-1]
    assert target.param_names[-1].endswith("bias") and bias_grad.shape == (10,)
    recovered = labels_from_bias_gradient(bias_grad, 6, mean_softmax_on_noise(model, SHAPE))
    assert recovered.tolist() == sorted(labels) and recovered.dtype == torch.int64
    resolved, source = resolve_labels(target)
    assert resolved.tolist() == sorted(labels) and source == "recovered"


def test_single_image_label_is_the_argmin():
    for true in range(10):
        target, _x = make_target(tiny_mlp(), plain_loss, seed=true, labels=[true], share_labels=False)
        bias_grad = target.shared_grads[-1]
        assert int(bias_grad.argmin()) == true
        assert labels_from_bias_gradient(bias_grad, 1).tolist() == [true]
        assert resolve_labels(target)[0].tolist() == [true]
    assert labels_from_bias_gradient(torch.tensor([0.3, 0.1, -0.2, -0.5, 0.3]), 1).tolist() == [3]


def test_cli_recovers_batch_labels(small, tmp_path):
    invoke_ok("attack", small["batch"], "--iterations", 2, "--seed", 0, "--out", tmp_path / "r")
    files = recon_files(tmp_path / "r")
    assert [f.name for f in files] == ["train-000000.safetensors", "train-000004.safetensors"]
    for path in files:
        recon = read_recon(path)
        truth = fileformat.read(small["batch"] / path.name.replace(".safetensors", ".truth.safetensors"), "truth")
        assert recon.meta["attack"]["label_source"] == "recovered"
        assert recon.tensors["images"].shape == (4, 3, 8, 8)
        assert recon.tensors["labels"].tolist() == sorted(truth.tensors["labels"].tolist())
    assert read_recon(files[1]).tensors["labels"].tolist() == [2, 9, 9, 9]  # repeated labels in the batch


# --- 7. resume equals uninterrupted ---------------------------------------------------------------


@pytest.mark.parametrize("method, defense", [
    (InvertingGradients, "none"), (InvertingGradients, "precode"), (NoiseInvertingGradients, "precode"),
    (AdaptiveInvertingGradients, "precode"),
])
@pytest.mark.parametrize("stop_at", [30, 55])  # on the first lr milestone (30 of 80), after the second (50)
def test_resume_equals_uninterrupted(method, defense, stop_at):
    model, loss_fn = (tiny_mlp(), plain_loss) if defense == "none" else (tiny_precode(), precode_loss)
    targets = [make_target(model, loss_fn, seed=10 + v, labels=[v])[0] for v in range(2)]
    full_attack = method(iterations=80, restarts=2)  # lr 0.01: the decays 0.01 -> 1e-3 -> 1e-4 must match exactly
    full = full_attack.run_many(targets, seed=4)
    first = method(iterations=80, restarts=2)
    partial = first.run_many(targets, seed=4, should_stop=stop_after(stop_at))
    outcome = first.last_outcome
    assert outcome.finished == stop_at and outcome.state is not None and outcome.state.step == stop_at
    assert all(p.loss_trace.shape == (stop_at,) for p in partial)
    # The stopped run keeps the restart that is best so far; every row's trace so far is in the state,
    # and the rows the full run keeps in the end have the full run's first `stop_at` losses.
    kept = full_attack.last_outcome.restart_losses.argmin(dim=1) * len(targets) + torch.arange(len(targets))
    assert torch.equal(outcome.state.tensors["traces"][kept, :stop_at],
                       torch.stack([f.loss_trace[:stop_at] for f in full]))
    torch.manual_seed(12345)  # another process, another global random state: the state brings its own
    resumed_attack = method(iterations=80, restarts=2)
    resumed = resumed_attack.run_many(targets, seed=4, resume=outcome.state)
    assert resumed_attack.last_outcome.state is None and resumed_attack.last_outcome.finished == 80
    for r, f in zip(resumed, full):
        assert torch.equal(r.inputs, f.inputs)
        assert torch.equal(r.loss_trace, f.loss_trace)
    assert torch.equal(resumed_attack.last_outcome.restart_losses, full_attack.last_outcome.restart_losses)


def test_match_gradients_resume_and_mismatched_state():
    model = tiny_precode()
    targets = [make_target(model, precode_loss, seed=1, labels=[3])[0]]
    labels = [targets[0].labels]
    config = MatchingConfig(iterations=40, lr=0.1, tv_weight=1e-4)
    full = match_gradients(targets, labels, config, seed=2)
    stopped = match_gradients(targets, labels, config, seed=2, should_stop=stop_after(17))
    resumed = match_gradients(targets, labels, config, seed=2, resume=stopped.state)
    assert torch.equal(resumed.inputs, full.inputs) and torch.equal(resumed.traces, full.traces)
    saved = []
    match_gradients(targets, labels, config, seed=2, checkpoint=saved.append, checkpoint_every=15)
    assert [s.step for s in saved] == [15, 30]  # none at the end: the finished run needs none
    from_checkpoint = match_gradients(targets, labels, config, seed=2, resume=saved[0])
    assert torch.equal(from_checkpoint.inputs, full.inputs)
    with pytest.raises(UserError, match="does not match this run"):
        match_gradients(targets, labels, MatchingConfig(iterations=50, lr=0.1), seed=2, resume=stopped.state)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_writes_a_checkpoint_and_resume_equals_an_uninterrupted_run(small, tmp_path, signum):
    assert (Path(precode_cli.__file__).parent / "__main__.py").is_file()
    options = ["--iterations", 400, "--checkpoint-iterations", 50, "--seed", 1]
    out, full = tmp_path / "interrupted", tmp_path / "full"
    command = [sys.executable, "-m", "precode_cli", "attack", str(small["plain"]), *map(str, options), "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob("*.safetensors")):
            if proc.poll() is not None:
                pytest.fail(f"the attack ended (exit {proc.returncode}) before its first checkpoint:\n"
                            f"{proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 240 s")
            time.sleep(0.01)
        proc.send_signal(signum)
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Stopped at iteration" in stderr and "--resume" in stderr
    checkpoints = sorted((out / "checkpoints").glob("*.safetensors"))
    assert [c.name for c in checkpoints] == ["train-000000.safetensors"]  # one chunk of four dumps
    step = fileformat.read(checkpoints[0], "attack-state").meta["step"]
    assert 50 <= step < 400
    names = [f"train-{i:06d}.safetensors" for i in range(4)]
    assert [p.name for p in recon_files(out)] == names
    for name in names:
        recon = read_recon(out / name)
        assert recon.meta["attack"]["completed"] is False
        assert recon.meta["attack"]["iterations_done"] == step
        assert recon.tensors["loss_trace"].shape == (step,)

    invoke_ok("attack", small["plain"], *options, "--out", out, "--resume")
    invoke_ok("attack", small["plain"], *options, "--out", full)
    assert not (out / "checkpoints").exists()
    for name in names:
        a, b = read_recon(out / name), read_recon(full / name)
        assert a.meta["attack"]["completed"] is True and a.meta["attack"]["iterations_done"] == 400
        for key in ("images", "labels", "loss_trace"):
            assert torch.equal(a.tensors[key], b.tensors[key]), (name, key)


# --- 8. checkpoint hygiene ------------------------------------------------------------------------


def test_a_finished_run_removes_its_checkpoints_and_is_not_overwritten(small, tmp_path, monkeypatch):
    written = []
    original = attack_stage._write_checkpoint

    def spy(path, *args, **kwargs):
        written.append(path.name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(attack_stage, "_write_checkpoint", spy)
    out = tmp_path / "r"
    args = ["attack", small["plain"], "--iterations", 100, "--checkpoint-iterations", 30, "--vectorize", 2, "--out", out]
    invoke_ok(*args)
    # Each of the two chunks checkpointed at 30, 60 and 90, then removed its checkpoint when done.
    assert sorted(written) == ["train-000000.safetensors"] * 3 + ["train-000002.safetensors"] * 3
    assert not (out / "checkpoints").exists()
    assert len(recon_files(out)) == 4
    before = tree_digest(out)
    assert_one_line_error(invoke(*args), "already exist", "--force")
    assert tree_digest(out) == before
    invoke_ok(*args, "--resume")  # everything is done: nothing to attack, nothing rewritten
    assert tree_digest(out) == before
    images = {p.name: read_recon(p).tensors["images"] for p in recon_files(out)}
    invoke_ok(*args, "--force")  # rewritten (new timestamps), same seed, same tensors
    assert tree_digest(out) != before
    assert {p.name: read_recon(p).tensors["images"] for p in recon_files(out)}.keys() == images.keys()
    for path in recon_files(out):
        assert torch.equal(read_recon(path).tensors["images"], images[path.name])


def test_interrupted_run_refuses_other_settings_and_resumes_exactly(small, tmp_path, monkeypatch):
    base = ["attack", small["plain"], "--iterations", 100, "--checkpoint-iterations", 25, "--vectorize", 2, "--seed", 0]
    out = tmp_path / "r"
    # Stop at step 40 of the second chunk: 1 query before chunk 1, 100 steps, 1 before chunk 2, 40 steps.
    monkeypatch.setattr(attack_stage, "GracefulStop", fake_stop(1 + 100 + 1 + 40))
    result = invoke(*base, "--out", out)
    monkeypatch.undo()
    assert result.exit_code == 130, result.output
    assert "Stopped at iteration 40 of 100" in result.stderr
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["train-000002.safetensors"]
    done = {p.name: read_recon(p).meta["attack"] for p in recon_files(out)}
    assert {n: (m["completed"], m["iterations_done"]) for n, m in done.items()} == {
        "train-000000.safetensors": (True, 100), "train-000001.safetensors": (True, 100),
        "train-000002.safetensors": (False, 40), "train-000003.safetensors": (False, 40)}

    before = tree_digest(out)
    assert_one_line_error(invoke(*base, "--out", out), "already exist", "--force")
    assert tree_digest(out) == before
    for other in (["--seed", 2], ["--iterations", 120], ["--lr", 0.1]):
        changed = [*base, *other] if other[0] != "--seed" else [*base[:-2], *other]
        result = invoke(*changed, "--out", out, "--resume")
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert (f"Error: {out / 'checkpoints' / 'train-000002.safetensors'} was written by another attack, settings "
                "or seed; resume with the same command, or start over with --force.") in result.stderr
        assert tree_digest(out) == before

    invoke_ok(*base, "--out", out, "--resume")
    invoke_ok(*base, "--out", tmp_path / "full")
    assert not (out / "checkpoints").exists()
    for path in recon_files(out):
        a, b = read_recon(path), read_recon(tmp_path / "full" / path.name)
        assert a.meta["attack"]["completed"] is True
        for key in ("images", "labels", "loss_trace"):
            assert torch.equal(a.tensors[key], b.tensors[key]), (path.name, key)


def test_resume_with_other_settings_is_one_sentence(small, tmp_path, monkeypatch):
    base = ["attack", small["plain"] / "train-000000.safetensors", "--iterations", 30, "--out", tmp_path / "r"]
    monkeypatch.setattr(attack_stage, "GracefulStop", fake_stop(1 + 10))
    assert invoke(*base).exit_code == 130
    monkeypatch.undo()
    assert_one_line_error(invoke(*base, "--seed", 2, "--resume"), "another attack, settings or seed", "--force")


def test_resume_after_the_dumps_changed_does_not_reuse_the_old_state(small, tmp_path, monkeypatch):
    grads = tmp_path / "grads"
    grads.mkdir()
    for i in (0, 1):
        copy_dump(small["plain"] / f"train-{i:06d}.safetensors", grads)  # with states/
    base = ["attack", grads, "--iterations", 60, "--seed", 0]
    monkeypatch.setattr(attack_stage, "GracefulStop", fake_stop(1 + 20))
    assert invoke(*base, "--out", tmp_path / "r").exit_code == 130
    monkeypatch.undo()
    # The same victims captured from other weights (seed 1) replace the dumps under the same names.
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:2", "--seed", 1, "--out", tmp_path / "new")
    for i in (0, 1):
        copy_dump(tmp_path / "new" / f"train-{i:06d}.safetensors", grads)
    resumed = invoke(*base, "--out", tmp_path / "r", "--resume")
    if resumed.exit_code == 2:  # refusing is fine, if it says which dump changed
        assert_one_line_error(resumed, "train-000000.safetensors")
        return
    assert resumed.exit_code == 0, resumed.output
    invoke_ok(*base, "--out", tmp_path / "fresh")
    for i in (0, 1):  # starting these dumps over is fine too; continuing the old state is not
        name = f"train-{i:06d}.safetensors"
        assert torch.equal(read_recon(tmp_path / "r" / name).tensors["images"],
                           read_recon(tmp_path / "fresh" / name).tensors["images"]), name


def test_resume_between_chunks_refuses_another_seed(small, tmp_path, monkeypatch):
    base = ["attack", small["plain"], "--iterations", 30, "--vectorize", 2, "--out", tmp_path / "r"]
    monkeypatch.setattr(attack_stage, "GracefulStop", fake_stop(1 + 30))  # stop before the second chunk
    result = invoke(*base, "--seed", 0)
    monkeypatch.undo()
    assert result.exit_code == 130 and "Stopped between dumps" in result.stderr
    assert not (tmp_path / "r" / "checkpoints").exists() and len(recon_files(tmp_path / "r")) == 2
    resumed = invoke(*base, "--seed", 5, "--resume")
    seeds = {read_recon(p).meta["attack"]["seed"] for p in recon_files(tmp_path / "r")}
    assert resumed.exit_code == 2 or seeds == {5}, (resumed.exit_code, seeds)


def test_a_stop_before_the_first_step_records_no_iteration(small, tmp_path, monkeypatch):
    monkeypatch.setattr(attack_stage, "GracefulStop", fake_stop(1))  # the chunk starts, step 0 sees the stop
    result = invoke("attack", small["plain"] / "train-000000.safetensors", "--iterations", 10, "--out", tmp_path / "r")
    monkeypatch.undo()
    assert result.exit_code == 130 and "Stopped at iteration 0 of 10" in result.stderr
    assert not (tmp_path / "r" / "train-000000.safetensors").exists()  # nothing computed, nothing to show
    assert (tmp_path / "r" / "checkpoints" / "train-000000.safetensors").exists()


class _ScaledLinear(nn.Module):
    """A model whose forward reads a buffer that is not BatchNorm's (a user's model may have one)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 4)
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) * self.scale)


def test_models_with_their_own_buffers_are_attacked_with_each_victims_buffer():
    """Victims differing only in a buffer: vectorised, each must get what it gets alone (the buffer is used)."""
    targets = []
    for i, scale in enumerate((1.0, 3.0)):
        model = _ScaledLinear(scale)
        x, y = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(i)), torch.tensor([i])
        names = [n for n, _ in model.named_parameters()]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        targets.append(AttackTarget(model, lambda m, logits, labels: F.cross_entropy(logits, labels), names,
                                    list(grads), y, 1, (1, 4, 4), 4, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)))
    config = MatchingConfig(iterations=20)
    together = match_gradients(targets, [t.labels for t in targets], config, seed=0)
    for i, target in enumerate(targets):
        alone = match_gradients([target], [target.labels], config, seed=0)
        assert torch.allclose(together.inputs[i], alone.inputs[0], atol=1e-5)
    assert not torch.allclose(together.inputs[0], together.inputs[1])
