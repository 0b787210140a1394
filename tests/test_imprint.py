"""A malicious server's imprint module ("Robbing the Fed"): known answers in memory and through the CLI.

In memory: an 8x8 MLP of width 32 (precode_cli.models, so the imprint goes in as capture puts it)
and six random images in normalised space; every image alone in its bin must come back to 1e-4,
with its label, with and without PRECODE. Through the CLI: small dumps of `--model mlp --width 32
--image-size 8` captured with `--threat imprint`, attacked, evaluated; hostile imprint metadata and
an honest dump are refused in one sentence.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attacks
from attacks.base import AttackTarget
from attacks.imprint import ImprintAttack
from defenses import DefenseStack
from helpers import DUMP0, assert_one_line_error, invoke, invoke_ok
from precode_cli import fileformat
from precode_cli.models import imprint
from test_schemas import meta_of, rewrite

SHAPE = (3, 8, 8)
SMALL = ["--model", "mlp", "--width", 32, "--image-size", 8]
PRECODE = [{"name": "precode", "params": {"k": 8, "beta": 0.001, "at": None}}]


def spec(bins: int = 64, measurement: str = "random") -> dict:
    return {"name": "mlp", "kwargs": {"width": 32}, "input_shape": list(SHAPE), "num_classes": 10,
            "imprint": {"bins": bins, "measurement": measurement, "seed": 3}}


def client_step(defenses: list, labels: list[int], seed: int = 0, bins: int = 64):
    """What the client shares for random images on the imprinted model; the target, images and labels."""
    torch.manual_seed(seed)
    stack = DefenseStack.from_specs(defenses)
    model = stack.build_model(spec(bins))
    x = torch.randn(len(labels), *SHAPE, generator=torch.Generator().manual_seed(seed + 1)).clamp(-2.5, 2.5)
    y = torch.tensor(labels)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(stack.loss(model, model(x), y), params)
    target = AttackTarget(
        model=model, loss_fn=stack.loss, param_names=list(names), shared_grads=[g.detach() for g in grads],
        labels=y, batch_size=len(labels), input_shape=SHAPE, num_classes=10,
        lower=torch.full((1, 3, 1, 1), -2.5), upper=torch.full((1, 3, 1, 1), 2.5),
    )
    return target, x, y


def alone(model, x: torch.Tensor) -> list[int]:
    """The images whose measurement no other image shares a bin with (from the module's own offsets)."""
    block = imprint.find(model)
    measured = x.flatten(1).double() @ block.bins.weight[0].double()
    cuts = -block.bins.bias.double()
    slot = (measured[:, None] > cuts[None, :]).sum(dim=1)  # bins an image activates = its bin index + 1
    return [i for i in range(len(x)) if (slot == slot[i]).sum() == 1]


def test_the_module_measures_one_direction_with_normal_quantile_offsets():
    block = imprint.find(DefenseStack([]).build_model(spec(bins=4, measurement="mean")))
    assert torch.equal(block.bins.weight, torch.full((4, math.prod(SHAPE)), 1 / math.prod(SHAPE)))
    assert block.bins.bias.tolist() == pytest.approx([10.0, 0.6744898, 0.0, -0.6744898], abs=1e-6)
    random = imprint.find(DefenseStack([]).build_model(spec(bins=4))).bins.weight.detach()
    assert torch.equal(random, random[:1].expand_as(random)) and float(random[0].norm()) == pytest.approx(1, abs=1e-6)


def test_the_rest_of_the_model_is_built_as_without_the_module():
    torch.manual_seed(5)
    honest = DefenseStack.from_specs(PRECODE).build_model({**spec(), "imprint": None})
    torch.manual_seed(5)
    served = DefenseStack.from_specs(PRECODE).build_model(spec())
    theirs = dict(served.named_parameters())
    for name, param in honest.named_parameters():  # same names, same values: nothing drawn from the global RNG
        assert torch.equal(param, theirs[name]), name
    assert sorted(set(theirs) - set(dict(honest.named_parameters()))) == [
        "imprint.back.bias", "imprint.back.weight", "imprint.bins.bias", "imprint.bins.weight"]


@pytest.mark.parametrize("defenses", [[], PRECODE], ids=["none", "precode"])
def test_every_image_alone_in_a_bin_is_read_off_exactly_with_its_label(defenses):
    target, x, y = client_step(defenses, labels=[4, 0, 9, 7, 2, 5])
    lone = alone(target.model, x)
    assert lone == list(range(6))  # the known setting: 6 images in 64 bins, each alone
    result = ImprintAttack().run(target, seed=0)
    assert result.inputs.shape == (6, *SHAPE) and result.label_source == "dump"
    for i in lone:
        errors = (result.inputs - x[i]).abs().flatten(1).max(dim=1).values
        best = int(errors.argmin())
        assert float(errors[best]) < 1e-4, (i, float(errors[best]))
        if not defenses:  # PRECODE's fresh noise leaves the label a guess; the image stays exact
            assert int(result.labels[best]) == int(y[i])
    assert sorted(result.labels.tolist()) == sorted(y.tolist())  # the batch's labels, reordered
    assert float(result.loss_trace[0]) == pytest.approx(0, abs=1e-6)


def test_gradient_noise_fills_every_bin_and_the_largest_are_kept():
    target, x, _ = client_step([], labels=[1, 2, 3])
    noisy = [g + 1e-3 * torch.randn(g.shape, generator=torch.Generator().manual_seed(9)) for g in target.shared_grads]
    result = ImprintAttack().run(AttackTarget(**{**target.__dict__, "shared_grads": noisy}), seed=0)
    assert result.inputs.shape == (3, *SHAPE)
    assert "64 of the imprint's 64 bins" in result.note and "kept the 3" in result.note
    assert float(result.loss_trace[0]) > 0.5  # most of the bias differences are noise


def test_a_model_without_the_module_is_refused():
    target, _, _ = client_step([], labels=[1, 2])
    torch.manual_seed(0)
    honest = DefenseStack([]).build_model({**spec(), "imprint": None})
    with pytest.raises(Exception, match="capture with --threat imprint"):
        ImprintAttack().check(AttackTarget(**{**target.__dict__, "model": honest}))
    with pytest.raises(Exception, match="takes no options"):
        attacks.create("imprint", iterations=10)


# --- through the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imprint")
    invoke_ok("capture-gradients", *SMALL, "--threat", "imprint", "--batch-size", 8, "--indices", "0:8",
              "--out", root / "grads")
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", root / "honest")
    return {"grads": root / "grads", "honest": root / "honest", "root": root}


def test_capture_attack_evaluate_recovers_the_batch(captured, tmp_path):
    meta = meta_of(captured["grads"] / DUMP0)
    assert meta["capture"]["threat"] == "imprint"
    assert meta["model"]["imprint"] == {"bins": 128, "measurement": "random", "seed": 0}  # 128: the default
    invoke_ok("attack", captured["grads"], "--method", "imprint", "--out", tmp_path / "recon")
    recon = fileformat.read(tmp_path / "recon" / DUMP0, "reconstruction")
    assert recon.meta["attack"]["threat_model"] == "malicious-server"
    hits = int(recon.meta["attack"]["note"].split(" ", 1)[0])
    invoke_ok("evaluate", tmp_path / "recon", "--truth", captured["grads"], "--out", tmp_path / "report")
    rows = json.loads((tmp_path / "report" / "metrics.json").read_text())["per_victim"]
    ssim = sorted(row["ssim"] for row in rows)
    assert len(ssim) == 8 and hits >= 6
    assert all(value > 0.999 for value in ssim[8 - hits:])  # every image read off a bin: the original
    assert sum(row["recon_label"] == row["true_label"] for row in rows) >= hits
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["groups"][0]["threat_model"] == \
        "malicious-server"
    assert "Threat model: a malicious server" in (tmp_path / "report" / "report.md").read_text()


def test_an_honest_dump_is_refused(captured, tmp_path):
    result = invoke("attack", captured["honest"], "--method", "imprint", "--out", tmp_path / "r")
    assert_one_line_error(result, "capture with --threat imprint")
    assert fileformat.read_meta(captured["honest"] / DUMP0, "gradients")["capture"]["threat"] == "honest"
    invoke_ok("attack", captured["honest"], "--method", "analytic", "--out", tmp_path / "analytic")
    honest = fileformat.read_meta(tmp_path / "analytic" / DUMP0, "reconstruction")["attack"]
    assert honest["threat_model"] == "honest-but-curious"


@pytest.mark.parametrize("edit,phrase", [
    (lambda m: {"model": {**m["model"], "imprint": {**m["model"]["imprint"], "bins": 1}}}, "model.imprint.bins"),
    (lambda m: {"model": {**m["model"], "imprint": {**m["model"]["imprint"], "bins": 10**9}}}, "model.imprint.bins"),
    (lambda m: {"model": {**m["model"], "imprint": {**m["model"]["imprint"], "measurement": "x"}}},
     "model.imprint.measurement"),
    (lambda m: {"capture": {**m["capture"], "threat": "honest"}}, "capture.threat"),
    (lambda m: {"model": {k: v for k, v in m["model"].items() if k != "imprint"}}, "capture.threat"),
], ids=["bins-1", "bins-huge", "measurement", "threat-honest", "no-module"])
def test_hostile_imprint_metadata_is_refused(captured, tmp_path, edit, phrase):
    source = captured["grads"] / DUMP0
    hostile = rewrite(source, tmp_path / "grads" / DUMP0, meta=edit(meta_of(source)))
    result = invoke("attack", hostile, "--method", "imprint", "--out", tmp_path / "r")
    assert_one_line_error(result, phrase)


@pytest.mark.parametrize("args,phrase", [
    (["--imprint-bins", 64], "add --threat imprint"),
    (["--imprint-measurement", "mean"], "add --threat imprint"),
])
def test_imprint_options_need_the_threat(tmp_path, args, phrase):
    result = invoke("capture-gradients", *SMALL, "--indices", "0:1", *args, "--out", tmp_path / "g")
    assert_one_line_error(result, phrase)


def test_out_of_range_bins_are_refused(tmp_path):
    result = invoke("capture-gradients", *SMALL, "--threat", "imprint", "--imprint-bins", 1, "--out", tmp_path / "g")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "g").exists()
