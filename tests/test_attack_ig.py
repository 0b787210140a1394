"""Inverting Gradients: known answers on the paper's MLP, label recovery, and determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attacks
from attacks.inverting_gradients import InvertingGradients, resolve_labels
from attacks.labels import labels_from_bias_gradient, output_bias_name
from helpers import DUMP0, TRUTH0, VICTIM_LABELS, invoke_ok
from precode_cli import data, fileformat, metrics
from precode_cli.errors import UserError
from precode_cli.stages.attack import target_from_dump


def _attack(dump: Path, iterations: int, seed: int = 0):
    stored = fileformat.read(dump, "gradients")
    target = target_from_dump(stored, dump)
    result = attacks.create("ig", iterations=iterations).run(target, seed=seed)
    images = data.denormalize(result.inputs, stored.meta["data"]).clamp(0, 1)
    return result, images


def _ssim(images: torch.Tensor, truth_path: Path) -> float:
    truth = fileformat.read(truth_path, "truth")
    return float(metrics.per_image(images, truth.tensors["images"])["ssim"][0])


def test_ig_recovers_the_victim_of_the_undefended_mlp(dumps):
    """Known answer: batch size 1, untrained MLP, no defense: near-perfect reconstruction."""
    result, images = _attack(dumps["plain"] / DUMP0, iterations=1000)
    ssim = _ssim(images, dumps["plain"] / TRUTH0)
    assert ssim >= 0.9, f"SSIM {ssim:.3f} after 1000 iterations"
    assert result.label_source == "dump"
    assert result.labels.tolist() == [VICTIM_LABELS[0]]
    assert result.loss_trace.shape == (1000,)
    assert result.loss_trace[-1] < result.loss_trace[0]


def test_ig_fails_against_precode(dumps):
    """Known answer: the same attack against PRECODE recovers nothing recognisable."""
    _result, images = _attack(dumps["precode"] / DUMP0, iterations=300)
    ssim = _ssim(images, dumps["precode"] / TRUTH0)
    assert ssim <= 0.3, f"SSIM {ssim:.3f} against PRECODE"


@pytest.mark.parametrize("name", ["plain_nolabels", "precode_nolabels"])
def test_labels_are_recovered_from_the_bias_gradient(dumps, name):
    for index, label in VICTIM_LABELS.items():
        dump = dumps[name] / f"train-{index:06d}.safetensors"
        stored = fileformat.read(dump, "gradients")
        assert "labels" not in stored.tensors and stored.meta["capture"]["labels_shared"] is False
        target = target_from_dump(stored, dump)
        assert target.labels is None
        labels, source = resolve_labels(target)
        assert source == "recovered"
        assert labels.dtype == torch.int64 and labels.tolist() == [label]
        bias = "classifier.layer.bias" if name.startswith("precode") else "classifier.bias"
        assert output_bias_name(target.param_names, [g.shape for g in target.shared_grads], 10) == bias


@pytest.mark.parametrize("name", ["plain_nolabels", "precode_nolabels"])
def test_attack_command_reports_recovered_labels(recon_nolabels, dumps, name):
    files = sorted(recon_nolabels[name].glob("*.safetensors"))
    assert [f.name for f in files] == ["train-000000.safetensors", "train-000001.safetensors"]
    for index, recon_path in enumerate(files):
        recon = fileformat.read(recon_path, "reconstruction")
        assert recon.meta["attack"]["label_source"] == "recovered"
        assert recon.tensors["labels"].tolist() == [VICTIM_LABELS[index]]
        truth = fileformat.read(dumps[name] / f"train-{index:06d}.truth.safetensors", "truth")
        assert torch.equal(recon.tensors["labels"], truth.tensors["labels"])


def test_label_rule_on_a_hand_made_gradient():
    # Mean cross-entropy bias gradient for one image: softmax - one_hot.
    probs = torch.tensor([0.1, 0.05, 0.3, 0.2, 0.35])
    for true in range(5):
        grad = probs - torch.nn.functional.one_hot(torch.tensor(true), 5).float()
        assert labels_from_bias_gradient(grad, 1).tolist() == [true]
    # Two distinct labels in a batch: the two most negative entries, smallest class first.
    grad = torch.tensor([0.2, -0.4, 0.1, -0.3, 0.4])
    assert labels_from_bias_gradient(grad, 2).tolist() == [1, 3]
    assert output_bias_name(["a.weight", "a.bias", "b.weight", "b.bias"],
                            [torch.Size([4, 3]), torch.Size([4]), torch.Size([5, 4]), torch.Size([5])], 5) == "b.bias"
    assert output_bias_name(["a.weight"], [torch.Size([5, 4])], 5) is None


@pytest.mark.parametrize("name", ["plain", "precode"])
def test_same_seed_gives_identical_reconstructions(dumps, tmp_path, name):
    dump = dumps[name] / DUMP0
    for out, seed in (("a", 3), ("b", 3), ("c", 4)):
        invoke_ok("attack", dump, "--iterations", 8, "--seed", seed, "--out", tmp_path / out)
    a, b, c = (fileformat.read(tmp_path / out / DUMP0, "reconstruction") for out in "abc")
    for key in ("images", "labels", "loss_trace"):
        assert a.tensors[key].dtype == b.tensors[key].dtype
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert a.meta["attack"]["seed"] == 3 and c.meta["attack"]["seed"] == 4
    assert not torch.equal(a.tensors["images"], c.tensors["images"])  # the seed matters
    assert a.tensors["images"].shape == (1, 3, 32, 32)
    assert 0 <= a.tensors["images"].min() and a.tensors["images"].max() <= 1
    assert a.tensors["loss_trace"].shape == (8,)


def test_ig_rejects_bad_settings():
    with pytest.raises(UserError, match="--iterations"):
        InvertingGradients(iterations=0)
    with pytest.raises(UserError, match="--lr"):
        InvertingGradients(lr=0.0)
    with pytest.raises(UserError, match="--tv-weight"):
        InvertingGradients(tv_weight=-1.0)
    with pytest.raises(UserError, match="--method"):
        attacks.create("nope")
