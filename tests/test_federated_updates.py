"""Client updates (FedAvg): capture's local training, the update file, and attacks that replay local steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import attacks
from attacks.optimization import MatchingConfig, make_problem
from attacks.unrolled import step_coefficients
from helpers import assert_one_line_error, invoke, invoke_ok
from precode_cli import data, fileformat, metrics
from precode_cli.errors import UserError
from precode_cli.local_training import LocalRecipe, sgd_step
from precode_cli.stages import profiles
from precode_cli.stages.attack import read_dump, target_from_dump

DUMP = "train-000000.safetensors"
TRUTH = "train-000000.truth.safetensors"


def _capture(out: Path, *extra: object) -> Path:
    invoke_ok("capture-gradients", "--indices", "0:2", "--seed", "3", "--out", out, *extra)
    return out


def _update(path: Path):
    return fileformat.read(path, "update", profile=profiles.for_files())


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
    """Two clients of one image each, three local steps of plain SGD, untrained MLP."""
    return _capture(tmp_path_factory.mktemp("u3"), "--local-steps", "3", "--local-lr", "0.1")


@pytest.mark.parametrize("defense", ["none", "precode"])
def test_one_local_step_is_the_shared_gradient_times_the_learning_rate(tmp_path, defense):
    """FedSGD as a special case: bit for bit, returned = param - lr * grad of the same weights, batch and seed."""
    grads = _capture(tmp_path / "g", "--defense", defense)
    update = _capture(tmp_path / "u", "--defense", defense, "--local-steps", "1", "--local-lr", "0.1")
    dump = fileformat.read(grads / DUMP, "gradients", profile=profiles.for_files())
    stored = _update(update / DUMP)
    names = list(dump.prefixed("grad"))
    assert names and sorted(names) == sorted(stored.prefixed("returned"))
    for name in names:
        expected = stored.tensors[f"param.{name}"] - 0.1 * dump.tensors[f"grad.{name}"]
        assert torch.equal(stored.tensors[f"returned.{name}"], expected), name
    assert stored.meta["local"]["steps"] == 1 and stored.meta["local"]["lr"] == 0.1


def test_sgd_step_is_torch_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    recipe = LocalRecipe(lr=0.05, steps=4, momentum=0.9, weight_decay=0.01)
    weight = torch.randn(5, 3)
    reference = torch.nn.Parameter(weight.clone())
    optimizer = torch.optim.SGD([reference], lr=0.05, momentum=0.9, weight_decay=0.01)
    params, buffers = {"w": weight.clone()}, {}
    for step in range(4):
        g = torch.randn(5, 3)
        params, buffers = sgd_step(params, {"w": g}, buffers, recipe, first=step == 0)
        reference.grad = g.clone()
        optimizer.step()
    torch.testing.assert_close(params["w"], reference.detach(), rtol=1e-6, atol=1e-7)


def test_momentum_coefficients_sum_the_directions():
    recipe = LocalRecipe(lr=1.0, steps=3, momentum=0.5)
    assert step_coefficients(recipe, 3) == [1 + 0.5 + 0.25, 1 + 0.5, 1.0]
    assert step_coefficients(LocalRecipe(lr=1.0, steps=3), 3) == [1.0, 1.0, 1.0]


def test_recipe_batches_cycle_in_order():
    recipe = LocalRecipe(lr=0.1, steps=5, batch_size=2, num_examples=3)
    assert [recipe.step_batch(s) for s in range(5)] == [(0, 2), (2, 3), (0, 2), (2, 3), (0, 2)]
    with pytest.raises(UserError, match="do not reach all 3 examples"):
        LocalRecipe(lr=0.1, steps=1, batch_size=2, num_examples=3)


def _truth_inputs(folder: Path) -> torch.Tensor:
    meta = fileformat.read_meta(folder / DUMP, "update")
    return data.normalize(fileformat.read(folder / TRUTH, "truth").tensors["images"], meta["data"])


@pytest.mark.parametrize("extra", [(), ("--defense", "precode"), ("--momentum", "0.9")], ids=["plain", "precode", "momentum"])
def test_replaying_the_local_steps_at_the_truth_matches_exactly_and_both_engines_agree(tmp_path, extra):
    """Known answer: at the client's real images the replayed update is the shared one (distance 0 without
    noise), and the factored engine computes the generic engine's objective and gradient."""
    folder = _capture(tmp_path / "u", "--local-steps", "3", "--local-lr", "0.1", *extra)
    target = target_from_dump(read_dump(folder / DUMP), folder / DUMP)
    assert target.local is not None and target.local.steps == 3
    results = {}
    for engine in ("factored", "generic"):
        problem = make_problem([target, target], [target.labels] * 2, MatchingConfig(iterations=10), seed=0)
        if engine == "generic":
            problem._step = problem._generic_step()
        with torch.no_grad():
            problem.inputs[0].copy_(_truth_inputs(folder))
        torch.manual_seed(0)
        grads, distance = problem.step()
        results[engine] = (grads[0], distance)
    assert problem.engine == "unrolled"
    factored, generic = results["factored"], results["generic"]
    torch.testing.assert_close(factored[1], generic[1].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(factored[0], generic[0], rtol=1e-3, atol=1e-6)
    if not extra or extra[0] != "--defense":
        assert float(factored[1][0]) < 1e-5  # the truth row; PRECODE's replayed noise differs from the client's
    assert float(factored[1][1]) > 0.1  # the random start row


def test_ig_reconstructs_the_image_behind_a_three_step_update(three_steps, tmp_path):
    """Known answer: an undefended untrained MLP leaks its client's image through three local steps."""
    invoke_ok("attack", three_steps / DUMP, "--method", "ig", "--iterations", "1000", "--out", tmp_path / "r")
    recon = fileformat.read(tmp_path / "r" / DUMP, "reconstruction")
    truth = fileformat.read(three_steps / TRUTH, "truth")
    ssim = float(metrics.per_image(recon.tensors["images"], truth.tensors["images"])["ssim"][0])
    assert ssim >= 0.8, f"SSIM {ssim:.3f}"
    assert recon.meta["source"]["content_sha256"] == fileformat.update_digest(_update(three_steps / DUMP).prefixed("returned"))
    report = tmp_path / "rep"
    invoke_ok("evaluate", tmp_path / "r", "--truth", three_steps, "--out", report)
    assert json.loads((report / "metrics.json").read_text())["groups"][0]["summary"]["n"] == 1


def test_analytic_reads_a_multi_step_update_of_one_image_exactly(three_steps, tmp_path):
    """Without weight decay every step's first-layer gradient is a multiple of the same image."""
    invoke_ok("attack", three_steps / DUMP, "--method", "analytic", "--out", tmp_path / "r")
    recon = fileformat.read(tmp_path / "r" / DUMP, "reconstruction")
    truth = fileformat.read(three_steps / TRUTH, "truth")
    torch.testing.assert_close(recon.tensors["images"], truth.tensors["images"], atol=2e-4, rtol=0)


def test_attacks_on_single_gradients_refuse_a_multi_step_update(three_steps, tmp_path):
    result = invoke("attack", three_steps / DUMP, "--method", "dlg", "--out", tmp_path / "r")
    assert_one_line_error(result, "matches a single gradient", "3 local steps", "--method ig")
    assert not (tmp_path / "r" / DUMP).exists()


def test_analytic_refuses_a_multi_step_update_with_weight_decay(tmp_path):
    folder = _capture(tmp_path / "u", "--local-steps", "2", "--weight-decay", "0.01")
    result = invoke("attack", folder / DUMP, "--method", "analytic", "--out", tmp_path / "r")
    assert_one_line_error(result, "without weight decay")


@pytest.mark.parametrize("args, phrase", [
    (("--local-lr", "0.1"), "add --local-steps"),
    (("--local-steps", "2", "--local-epochs", "1"), "give one"),
    (("--local-steps", "1", "--batch-size", "2", "--indices", "0:2", "--local-batch-size", "1"), "do not reach all 2"),
    (("--local-steps", "1", "--local-lr", "0"), "--local-lr must be a positive number"),
])
def test_bad_local_recipes_are_one_sentence(tmp_path, args, phrase):
    result = invoke("capture-gradients", "--out", tmp_path / "u", *args)
    assert_one_line_error(result, phrase)
    assert not (tmp_path / "u").exists() or not list((tmp_path / "u").glob("*.safetensors"))


def test_local_epochs_count_the_steps(tmp_path):
    folder = _capture(tmp_path / "u", "--batch-size", "2", "--local-batch-size", "1", "--local-epochs", "2")
    local = fileformat.read_meta(folder / DUMP, "update")["local"]
    assert (local["steps"], local["epochs"], local["batch_size"], local["num_examples"]) == (4, 2, 1, 2)


def _rewrite(path: Path, out: Path, *, meta: dict | None = None, drop: str | None = None) -> Path:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        metadata = dict(f.metadata())
    for key, value in (meta or {}).items():
        metadata[key] = json.dumps(value)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_update_files_are_validated_against_their_schema(three_steps, tmp_path):
    source = three_steps / DUMP
    local = fileformat.read_meta(source, "update")["local"]
    bad = {
        "examples": {"local": {**local, "num_examples": 2}},
        "steps": {"local": {**local, "steps": 0}},
        "known": {"local": {**local, "known": ["the moon"]}},
    }
    for name, meta in bad.items():
        path = _rewrite(source, tmp_path / f"{name}.safetensors", meta=meta)
        with pytest.raises(UserError, match="precode-update schema"):
            _update(path)
    missing = _rewrite(source, tmp_path / "missing.safetensors", drop="returned.classifier.bias")
    with pytest.raises(UserError, match="lacks the tensor 'returned.classifier.bias'"):
        _update(missing)
    result = invoke("attack", three_steps / TRUTH, three_steps / DUMP, "--out", tmp_path / "r", "--iterations", "1")
    assert result.exit_code == 0  # the truth file is skipped by name, the update attacked


def test_a_file_of_another_kind_is_named_as_neither_dump_nor_update(tmp_path, three_steps):
    other = tmp_path / "model.safetensors"
    fileformat.write(other, "truth", {"images": torch.zeros(1, 3, 32, 32), "labels": torch.zeros(1, dtype=torch.int64),
                                      "indices": torch.zeros(1, dtype=torch.int64)}, {})
    result = invoke("attack", other, "--out", tmp_path / "r")
    assert_one_line_error(result, "a gradient dump", "or a client update")


def test_labels_of_a_multi_step_update_are_recovered_when_the_client_keeps_them(tmp_path):
    """Every step's output-bias gradient is negative only at the true class, so their sum still shows it."""
    folder = _capture(tmp_path / "u", "--local-steps", "3", "--local-lr", "0.1", "--no-share-labels")
    invoke_ok("attack", folder / DUMP, "--iterations", "1", "--out", tmp_path / "r")
    recon = fileformat.read(tmp_path / "r" / DUMP, "reconstruction")
    truth = fileformat.read(folder / TRUTH, "truth")
    assert recon.meta["attack"]["label_source"] == "recovered"
    assert torch.equal(recon.tensors["labels"], truth.tensors["labels"])


def test_an_interrupted_replay_resumes_to_the_same_result(tmp_path):
    """ig-noise on a PRECODE update: one noise sample per local step ([rows, steps, B, K]) survives a checkpoint."""
    folder = _capture(tmp_path / "u", "--defense", "precode", "--local-steps", "2", "--local-lr", "0.1")
    target = target_from_dump(read_dump(folder / DUMP), folder / DUMP)
    whole = attacks.create("ig-noise", iterations=6).run_many([target], seed=1)[0]
    attack = attacks.create("ig-noise", iterations=6)
    calls = iter(range(100))
    attack.run_many([target], seed=1, should_stop=lambda: next(calls) >= 3)
    state = attack.last_outcome.state
    assert state is not None and state.step == 3 and state.tensors["noise.classifier.bottleneck"].dim() == 4
    resumed = attacks.create("ig-noise", iterations=6).run_many([target], seed=1, resume=state)[0]
    assert torch.equal(resumed.inputs, whole.inputs)
    assert torch.equal(resumed.loss_trace, whole.loss_trace)
