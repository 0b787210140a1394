"""BatchNorm statistics as a leak and a prior: `capture-gradients --record-bn-stats` and `--method ig-bn`.

The dumps come from the real command on Inverting Gradients' ConvNet at width 2 (eight conv-BatchNorm
blocks, 3,102 parameters) and 16-pixel built-in images, so every test is fast. Known answers: the
recorded statistics are the mean and biased variance of each BatchNorm input computed by hand, and
also what the server reads off the client's update of the running statistics; GradInversion's term
is zero at the true batch and the sum of two norms elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from attacks.base import AttackTarget
from attacks.bn_prior import BatchNormInvertingGradients, BatchNormPrior
from attacks.inverting_gradients import InvertingGradients
from helpers import DUMP0, TRUTH0, assert_one_line_error, invoke, invoke_ok
from precode_cli import bn_stats, data, fileformat
from precode_cli.errors import UserError
from precode_cli.stages import profiles
from precode_cli.stages.attack import read_dump, target_from_dump

TINY = ["--model", "convnet", "--width", 2, "--image-size", 16]
LAYERS = [f"features.bn{i}" for i in range(8)]


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, Path]:
    """bn: victims 0..3 in batches of 2 with BatchNorm statistics; plain: victims 0, 1 without them."""
    root = tmp_path_factory.mktemp("bn-grads")
    invoke_ok("capture-gradients", *TINY, "--indices", "0:4", "--batch-size", 2, "--record-bn-stats",
              "--out", root / "bn")
    invoke_ok("capture-gradients", *TINY, "--indices", "0:2", "--batch-size", 2, "--out", root / "plain")
    return {"bn": root / "bn", "plain": root / "plain"}


def _read(path: Path) -> fileformat.StoredFile:
    return fileformat.read(path, "gradients", profile=profiles.for_files())


def _target(path: Path) -> AttackTarget:
    return target_from_dump(read_dump(path), path)


def _true_inputs(grads: Path, dump: str = DUMP0) -> torch.Tensor:
    truth = fileformat.read(grads / dump.replace(".safetensors", ".truth.safetensors"), "truth")
    return data.normalize(truth.tensors["images"], truth.meta["data"])


# --- capture ----------------------------------------------------------------------------------------

def test_recorded_stats_are_the_first_batchnorm_inputs_statistics_by_hand(dumps):
    stored = _read(dumps["bn"] / DUMP0)
    assert stored.meta["bn_stats"] == {"revealed_by": "client BatchNorm update", "variance": "biased",
                                       "layers": LAYERS}
    x = _true_inputs(dumps["bn"])
    conv = F.conv2d(x, stored.tensors["param.features.conv0.weight"], stored.tensors["param.features.conv0.bias"],
                    padding=1)  # the input of features.bn0: [2, 2, 16, 16]
    per_channel = conv.transpose(0, 1).reshape(2, -1)  # 2 images x 256 pixels per channel
    mean = per_channel.sum(dim=1) / per_channel.shape[1]
    variance = ((per_channel - mean[:, None]) ** 2).sum(dim=1) / per_channel.shape[1]  # biased: / n, not n - 1
    torch.testing.assert_close(stored.tensors["bn_stats.features.bn0.mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored.tensors["bn_stats.features.bn0.var"], variance, rtol=1e-5, atol=1e-6)
    assert float(variance.min()) > 0


def test_the_server_reads_the_same_stats_off_the_clients_running_statistics(dumps):
    """The threat model: the client's BatchNorm update (momentum 0.1) gives every recorded layer's stats."""
    target, stored = _target(dumps["bn"] / DUMP0), _read(dumps["bn"] / DUMP0)
    model, x = target.model, _true_inputs(dumps["bn"])
    before = {n: b.clone() for n, b in model.named_buffers()}
    modules = dict(model.named_modules())
    with bn_stats.watching(model, LAYERS) as seen:
        model.train()(x)  # the client's forward pass moves the running statistics
    for layer in LAYERS:
        n = bn_stats.values_per_channel(tuple(seen[layer][0].shape))
        mean, variance = bn_stats.from_update(before[f"{layer}.running_mean"], before[f"{layer}.running_var"],
                                              modules[layer].running_mean, modules[layer].running_var,
                                              modules[layer].momentum, n)
        torch.testing.assert_close(mean, stored.tensors[f"bn_stats.{layer}.mean"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(variance, stored.tensors[f"bn_stats.{layer}.var"], rtol=1e-4, atol=1e-5)


def test_a_dump_captured_without_the_option_has_none(dumps):
    stored = _read(dumps["plain"] / DUMP0)
    assert "bn_stats" not in stored.meta
    assert not [name for name in stored.tensors if name.startswith(bn_stats.PREFIX)]
    assert _target(dumps["plain"] / DUMP0).bn_stats is None


def test_a_dump_round_trip_gives_the_attack_every_layers_stats(dumps):
    stored, target = _read(dumps["bn"] / DUMP0), _target(dumps["bn"] / DUMP0)
    assert list(target.bn_stats) == LAYERS
    for layer, (mean, variance) in target.bn_stats.items():
        assert torch.equal(mean, stored.tensors[f"bn_stats.{layer}.mean"])
        assert torch.equal(variance, stored.tensors[f"bn_stats.{layer}.var"])
        assert mean.dtype == torch.float32 and mean.shape == target.model.get_submodule(layer).running_mean.shape


@pytest.mark.parametrize("args,phrase", [
    (["--model", "mlp", "--width", 8, "--image-size", 8], "no BatchNorm layer"),
    ([*TINY, "--mode", "eval"], "--mode eval"),
    ([*TINY, "--batch-size", 2, "--local-steps", 2], "several local steps"),
])
def test_capture_refuses_what_reveals_no_batchnorm_statistics(tmp_path, args, phrase):
    result = invoke("capture-gradients", *args, "--indices", "0:2", "--record-bn-stats", "--out", tmp_path / "g")
    assert_one_line_error(result, "--record-bn-stats", phrase)
    assert not (tmp_path / "g").exists()


# --- the prior ----------------------------------------------------------------------------------------

def test_the_prior_is_zero_at_the_true_batch_and_positive_elsewhere(dumps):
    target = _target(dumps["bn"] / DUMP0)
    prior = BatchNormPrior(target.model, [target], restarts=1, device=torch.device("cpu"))
    target.model.train()

    def penalty(x: torch.Tensor) -> float:
        with torch.no_grad(), prior.watching() as seen:
            target.model(x)
        return float(prior.penalty(seen, 0))

    assert penalty(_true_inputs(dumps["bn"])) < 1e-5
    assert penalty(_true_inputs(dumps["bn"], "train-000002.safetensors")) > 0.1  # other victims
    assert penalty(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))) > 0.1


def test_the_prior_is_the_sum_of_the_two_norms_per_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 3, 1),
                          nn.BatchNorm2d(3))
    recorded = {"1": (torch.tensor([0.5, -0.5]), torch.tensor([1.0, 2.0])), "4": (torch.zeros(3), torch.ones(3))}
    target = AttackTarget(model=model, loss_fn=lambda m, o, y: o.sum(), param_names=[], shared_grads=[],
                          labels=None, batch_size=3, input_shape=(1, 5, 5), num_classes=3,
                          lower=torch.zeros(1, 1, 1, 1), upper=torch.ones(1, 1, 1, 1), bn_stats=recorded)
    prior = BatchNormPrior(model, [target], restarts=1, device=torch.device("cpu"))
    x = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), prior.watching() as seen:
        model.train()(x)
    with torch.no_grad():
        first = model[0](x)
        second = model[3](model[2](model[1](first)))
    expected = 0.0
    for inputs, (mean, variance) in ((first, recorded["1"]), (second, recorded["4"])):
        values = inputs.transpose(0, 1).flatten(1)
        expected += float((values.mean(1) - mean).norm() + (values.var(1, unbiased=False) - variance).norm())
    assert float(prior.penalty(seen, 0)) == pytest.approx(expected, rel=1e-5)


def test_ig_bn_rows_use_their_own_victims_stats(dumps):
    """Two dumps and two restarts at once (the looped engine) give what each dump gets alone (autograd)."""
    paths = [dumps["bn"] / DUMP0, dumps["bn"] / "train-000002.safetensors"]
    attack = BatchNormInvertingGradients(iterations=6, restarts=2, bn_weight=0.1)
    together = attack.run_many([_target(p) for p in paths], seed=3)
    for path, result in zip(paths, together):
        alone = BatchNormInvertingGradients(iterations=6, restarts=2, bn_weight=0.1).run_many([_target(path)], seed=3)
        torch.testing.assert_close(result.inputs, alone[0].inputs, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.loss_trace, alone[0].loss_trace, rtol=1e-4, atol=1e-6)


def test_ig_bn_brings_the_batch_statistics_closer_than_ig(dumps):
    """The prior does its job: after the same iterations from the same start, ig-bn's images reproduce the
    recorded statistics far better than ig's."""
    path = dumps["bn"] / DUMP0

    def final_penalty(attack: InvertingGradients) -> float:
        x = attack.run(_target(path), seed=0).inputs
        target = _target(path)
        prior = BatchNormPrior(target.model, [target], restarts=1, device=torch.device("cpu"))
        with torch.no_grad(), prior.watching() as seen:
            target.model.train()(x)
        return float(prior.penalty(seen, 0))

    plain = final_penalty(InvertingGradients(iterations=40, lr=0.1))
    with_prior = final_penalty(BatchNormInvertingGradients(iterations=40, lr=0.1, bn_weight=1.0))
    assert with_prior < 0.6 * plain, (with_prior, plain)  # measured: 1.09 against 2.62


# --- the command line ------------------------------------------------------------------------------

def test_ig_bn_through_the_cli_records_its_weight(dumps, tmp_path):
    invoke_ok("attack", dumps["bn"], "--method", "ig-bn", "--iterations", 3, "--bn-weight", 0.05, "--threads", 1,
              "--out", tmp_path / "recon")
    recon = fileformat.read(tmp_path / "recon" / DUMP0, "reconstruction")
    assert recon.meta["attack"]["name"] == "ig-bn" and recon.meta["attack"]["params"]["bn_weight"] == 0.05
    assert recon.tensors["images"].shape == (2, 3, 16, 16) and len(recon.tensors["loss_trace"]) == 3
    invoke_ok("attack", dumps["bn"] / DUMP0, "--iterations", 1, "--out", tmp_path / "ig")  # plain ig ignores them
    assert "bn_weight" not in fileformat.read(tmp_path / "ig" / DUMP0, "reconstruction").meta["attack"]["params"]


def test_ig_bn_refuses_a_dump_without_stats(dumps, tmp_path):
    result = invoke("attack", dumps["plain"], "--method", "ig-bn", "--iterations", 1, "--out", tmp_path / "r")
    assert_one_line_error(result, "ig-bn", "records none", "--record-bn-stats")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,phrase", [
    (["--method", "ig-bn", "--bn-weight", 0], "--bn-weight must be above 0"),
    (["--method", "ig", "--bn-weight", 0.1], "--bn-weight does not apply to --method ig"),
])
def test_bad_bn_weights_are_one_sentence(dumps, tmp_path, args, phrase):
    assert_one_line_error(invoke("attack", dumps["bn"], *args, "--out", tmp_path / "r"), phrase)


# --- hostile files -------------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, tensors=None, meta=None) -> Path:
    """A copy of dump `src` (beside it, sharing its model state) with tensors and metadata changed."""
    with safe_open(str(src), framework="pt") as f:
        table = {name: f.get_tensor(name) for name in f.keys()}
        raw = dict(f.metadata())
    if tensors is not None:
        table = tensors(table)
    if meta is not None:
        decoded = {k: (v if k in ("format", "format_version") else json.loads(v)) for k, v in raw.items()}
        meta(decoded)
        raw = {k: (v if k in ("format", "format_version") else json.dumps(v)) for k, v in decoded.items()}
    save_file(table, str(dst), metadata=raw)
    return dst


def _set(key: str, value):
    def change(meta: dict) -> None:
        meta["bn_stats"][key] = value
    return change


def _mode_eval(meta: dict) -> None:
    meta["capture"]["mode"] = "eval"


@pytest.mark.parametrize("tensors,meta,phrases", [
    (lambda t: {**t, "bn_stats.features.bn0.mean": torch.zeros(3)}, None,
     ["'bn_stats.features.bn0.mean' of shape '[3]'", "its metadata says [2]"]),
    (lambda t: {**t, "bn_stats.features.bn3.var": torch.zeros(8, 1)}, None, ["bn3.var", "[8, 1]"]),
    (lambda t: {k: v for k, v in t.items() if k != "bn_stats.features.bn7.var"}, None, ["lacks the tensor",
                                                                                         "bn7.var"]),
    (None, _set("layers", [*LAYERS, "classifier"]), ["'classifier'", "not a BatchNorm layer"]),
    (None, _set("layers", [*LAYERS, LAYERS[0]]), ["bn_stats: a layer is listed twice"]),
    (None, _set("revealed_by", "a guess"), ["bn_stats.revealed_by"]),
    (None, _mode_eval, ["train mode only"]),
])
def test_hostile_bn_stats_are_refused_from_the_header(dumps, monkeypatch, tensors, meta, phrases):
    hostile = _rewrite(dumps["bn"] / DUMP0, dumps["bn"] / "hostile.safetensors", tensors, meta)
    try:
        def never(*_args):
            raise AssertionError("tensors were loaded before the header was checked")

        monkeypatch.setattr(fileformat, "_load_tensors", never)
        with pytest.raises(UserError) as refused:
            _read(hostile)
        for phrase in phrases:
            assert phrase in str(refused.value), str(refused.value)
    finally:
        hostile.unlink()


def test_stats_in_a_dump_that_declares_none_are_refused(dumps, tmp_path):
    hostile = _rewrite(dumps["plain"] / DUMP0, dumps["plain"] / "hostile.safetensors",
                       tensors=lambda t: {**t, "bn_stats.features.bn0.mean": torch.zeros(2)})
    try:
        result = invoke("attack", hostile, "--method", "ig-bn", "--out", tmp_path / "r")
        assert_one_line_error(result, "bn_stats.features.bn0.mean", "does not have")
    finally:
        hostile.unlink()
