"""Evaluation conventions: the notebook's normalised SSIM, batch matching, and the comparison report."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

from helpers import invoke_ok
from precode_cli import data, metrics

CIFAR_SPEC = {"mean": [0.4914672374725342, 0.4822617471218109, 0.4467701315879822],
              "std": [0.24703224003314972, 0.24348513782024384, 0.26158785820007324]}


@pytest.fixture(scope="module")
def victims():
    return data.load("builtin", "test").images[:6]


def test_identical_images_score_one_in_both_spaces(victims):
    for space in metrics.SPACES:
        scores = metrics.per_image(victims, victims.clone(), space, CIFAR_SPEC)
        assert torch.allclose(scores["ssim"], torch.ones(6), atol=1e-5), space
        assert scores["psnr"].tolist() == [metrics.PSNR_CAP_DB] * 6


def test_normalized_ssim_is_ssim_of_the_normalised_pair(victims):
    """The notebook's convention on a known pair: SSIM of (x - mean) / std with the original's data range."""
    original = victims[:1]
    noisy = (original + 0.1 * torch.randn(original.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    mean = torch.tensor(CIFAR_SPEC["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_SPEC["std"]).view(1, 3, 1, 1)
    a, b = ((noisy.double() - mean) / std), ((original.double() - mean) / std)
    expected = structural_similarity_index_measure(a, b, data_range=float(b.max() - b.min()))
    got = metrics.ssim(noisy, original, "normalized", CIFAR_SPEC)
    assert abs(float(got[0]) - float(expected)) < 1e-5
    pixel = metrics.ssim(noisy, original, "pixel")
    assert abs(float(got[0]) - float(pixel[0])) > 1e-3  # a different convention gives a different number


def test_normalized_ssim_clips_negative_values_to_zero(victims):
    """Our reading of the notebook: SSIM of the normalised pair, negative values clipped to 0."""
    mean = torch.tensor(CIFAR_SPEC["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_SPEC["std"]).view(1, 3, 1, 1)
    raw, ours = [], []
    for index in range(6):
        original = victims[index : index + 1]
        mirrored = (2 * original.mean(dim=(2, 3), keepdim=True) - original).clamp(0, 1)  # anti-correlated
        for candidate in (mirrored, torch.rand(original.shape, generator=torch.Generator().manual_seed(index))):
            a, b = (candidate.double() - mean) / std, (original.double() - mean) / std
            raw.append(float(structural_similarity_index_measure(a, b, data_range=float(b.max() - b.min()))))
            ours.append(float(metrics.ssim(candidate, original, "normalized", CIFAR_SPEC)[0]))
    assert any(r < 0 for r in raw), raw  # the check below must see a negative value
    assert ours == pytest.approx([max(r, 0.0) for r in raw], abs=1e-5)


def test_a_shuffled_batch_is_matched_back(victims):
    permutation = [3, 0, 5, 1, 4, 2]
    shuffled = victims[permutation] + 0.02 * torch.randn(victims.shape, generator=torch.Generator().manual_seed(1))
    order = metrics.match_batch(shuffled.clamp(0, 1), victims)
    assert [permutation[j] for j in order] == list(range(6))  # each original gets its own noisy copy back


def test_batches_are_matched_and_the_report_has_one_row_per_input(tmp_path):
    """Batch size 3 dumps of two models; the comparison table has one row per RECON_DIR."""
    common = ["--model", "mlp", "--width", 16, "--indices", "0:6", "--batch-size", 3, "--seed", 0]
    for defense in ("none", "precode"):
        invoke_ok("capture-gradients", *common, "--defense", defense, "--out", tmp_path / f"g-{defense}")
        invoke_ok("attack", tmp_path / f"g-{defense}", "--iterations", 2, "--out", tmp_path / f"r-{defense}")
    out = tmp_path / "report"
    result = invoke_ok("evaluate", tmp_path / "r-none", tmp_path / "r-precode", "--truth", tmp_path / "g-none",
                       "--truth", tmp_path / "g-precode", "--space", "normalized", "--out", out)
    document = json.loads((out / "metrics.json").read_text())
    assert [g["defense"] for g in document["groups"]] == ["none", "precode"]
    assert document["space"] == "normalized" and "normalised" in document["convention"]
    assert "linear_sum_assignment" in document["matching"]
    assert all(g["model_state"] == "untrained" for g in document["groups"])
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 12
    for recon_file in {r["recon_file"] for r in rows if r["group"].startswith("mlp + none")}:
        matched = sorted(int(r["matched_position"]) for r in rows
                         if r["recon_file"] == recon_file and r["group"].startswith("mlp + none"))
        assert matched == [0, 1, 2]  # a permutation of the batch
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| `")]
    assert len(table) == 2
    assert "ssim_hist.png" in (out / "report.md").read_text()
    for picture in ("grid.png", "ssim_hist.png"):
        with Image.open(out / picture) as image:
            assert image.width > 200 and image.height > 100
    assert "test acc" in result.stdout and (out / "report.md").read_text().count("| untrained |") == 2


def test_test_accuracy_of_a_trained_run_is_reported(tmp_path):
    invoke_ok("train", "--model", "mlp", "--width", 16, "--epochs", 1, "--subset", 200, "--out", tmp_path / "run")
    invoke_ok("capture-gradients", tmp_path / "run", "--indices", "0:1", "--out", tmp_path / "g")
    invoke_ok("attack", tmp_path / "g", "--iterations", 1, "--out", tmp_path / "r")
    invoke_ok("evaluate", tmp_path / "r", "--truth", tmp_path / "g", "--out", tmp_path / "report")
    group = json.loads((tmp_path / "report" / "metrics.json").read_text())["groups"][0]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert group["model_state"] == "epoch 1"
    assert group["test_accuracy"] == pytest.approx(history["test_accuracy"])


def test_lpips_from_a_local_backbone_file(tmp_path):
    """LPIPS with AlexNet weights from a local safetensors file (random weights here: the plumbing, not the values)."""
    from safetensors.torch import save_file
    from torchvision.models import alexnet

    from precode_cli.lpips import load_lpips, lpips_distance

    torch.manual_seed(0)
    weights = tmp_path / "alexnet.safetensors"
    save_file(alexnet().state_dict(), str(weights))
    model = load_lpips(weights)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert lpips_distance(model, x, x).tolist() == [0.0, 0.0]
    assert (lpips_distance(model, y, x) > 0).all()
    invoke_ok("capture-gradients", "--model", "mlp", "--width", 16, "--indices", "0:2", "--out", tmp_path / "g")
    invoke_ok("attack", tmp_path / "g", "--iterations", 1, "--out", tmp_path / "r")
    invoke_ok("evaluate", tmp_path / "r", "--truth", tmp_path / "g", "--lpips-weights", weights, "--out", tmp_path / "e")
    document = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert document["summary"]["mean_lpips"] > 0
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    from helpers import assert_one_line_error, invoke
    assert_one_line_error(invoke("evaluate", tmp_path / "r", "--truth", tmp_path / "g", "--lpips-weights", bad,
                                 "--out", tmp_path / "e2"), "AlexNet")
