"""Metrics (SSIM, PSNR, MSE) and how evaluate pairs reconstructions with truth files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import DUMP0, VICTIM_LABELS, assert_one_line_error, invoke, invoke_ok, tree_digest
from precode_cli import data, metrics, report


@pytest.fixture(scope="module")
def victims():
    return data.load("builtin", "test").images[:4]


def test_identical_images(victims):
    scores = metrics.per_image(victims, victims.clone())
    assert torch.allclose(scores["ssim"], torch.ones(4), atol=1e-5)
    assert scores["psnr"].tolist() == [metrics.PSNR_CAP_DB] * 4 == [100.0] * 4
    assert scores["mse"].tolist() == [0.0] * 4
    assert all(torch.isfinite(v).all() for v in scores.values())


def test_unrelated_random_image_scores_low(victims):
    noise = torch.rand(victims.shape, generator=torch.Generator().manual_seed(0))
    scores = metrics.per_image(noise, victims)
    assert (scores["ssim"] < 0.15).all(), scores["ssim"]
    assert (scores["psnr"] < 15).all(), scores["psnr"]
    assert (scores["mse"] > 0.02).all()


def test_scores_follow_the_error(victims):
    gen = torch.Generator().manual_seed(1)
    small = (victims + 0.02 * torch.randn(victims.shape, generator=gen)).clamp(0, 1)
    large = (victims + 0.2 * torch.randn(victims.shape, generator=gen)).clamp(0, 1)
    s, l = metrics.per_image(small, victims), metrics.per_image(large, victims)
    assert (s["ssim"] > l["ssim"]).all() and (s["psnr"] > l["psnr"]).all() and (s["mse"] < l["mse"]).all()
    assert (s["ssim"] > 0.8).all()
    # PSNR = 10 log10(1 / MSE) for data range 1.
    assert torch.allclose(s["psnr"], 10 * torch.log10(1 / s["mse"]), rtol=1e-4)


def test_reconstructions_are_clamped_to_pixel_range(victims):
    outside = victims * 3 - 1  # values well outside [0, 1]
    assert torch.allclose(metrics.per_image(outside, victims)["mse"],
                          metrics.per_image(outside.clamp(0, 1), victims)["mse"])


def test_summary_asr_and_label_accuracy():
    rows = [
        {"ssim": 0.9, "psnr": 30.0, "mse": 0.001, "true_label": 1, "recon_label": 1},
        {"ssim": 0.6, "psnr": 20.0, "mse": 0.01, "true_label": 2, "recon_label": 3},
        {"ssim": 0.1, "psnr": 10.0, "mse": 0.1, "true_label": 0, "recon_label": 0},
        {"ssim": 0.59, "psnr": 10.0, "mse": 0.1, "true_label": 0, "recon_label": 0},
    ]
    s = report.summarize(rows, 0.6)
    assert s["n"] == 4
    assert s["asr"] == pytest.approx(0.5)  # SSIM >= threshold counts; 0.59 does not
    assert s["label_accuracy"] == pytest.approx(0.75)
    assert s["mean_ssim"] == pytest.approx(0.5475)
    assert s["mean_psnr"] == pytest.approx(17.5)


def test_evaluate_pairs_by_dump_hash_not_by_name(dumps, recon_nolabels, tmp_path):
    """Truth files renamed crosswise are still matched to the dump each reconstruction came from."""
    grads = dumps["plain_nolabels"]
    swapped = tmp_path / "truth"
    swapped.mkdir()
    shutil.copy2(grads / "train-000000.truth.safetensors", swapped / "train-000001.truth.safetensors")
    shutil.copy2(grads / "train-000001.truth.safetensors", swapped / "train-000000.truth.safetensors")
    out = tmp_path / "report"
    invoke_ok("evaluate", recon_nolabels["plain_nolabels"], "--truth", swapped, "--out", out)
    rows = json.loads((out / "metrics.json").read_text())["per_victim"]
    by_file = {row["recon_file"]: row for row in rows}
    for index in (0, 1):
        row = by_file[f"train-{index:06d}.safetensors"]
        assert row["dataset_index"] == index
        assert row["true_label"] == VICTIM_LABELS[index]
        assert row["recon_label"] == VICTIM_LABELS[index]


def test_evaluate_refuses_a_reconstruction_without_its_truth(dumps, recon_nolabels, tmp_path):
    out = tmp_path / "report"
    before = tree_digest(recon_nolabels["plain_nolabels"], dumps["precode"])
    # The truth files of another GRADS_DIR have the same names but belong to other dumps.
    result = invoke("evaluate", recon_nolabels["plain_nolabels"], "--truth", dumps["precode"], "--out", out)
    message = assert_one_line_error(result, "no truth file", "--truth", DUMP0)
    assert str(recon_nolabels["plain_nolabels"]) in message
    assert tree_digest(recon_nolabels["plain_nolabels"], dumps["precode"]) == before
    assert not out.exists() or not any(out.iterdir())


def test_evaluate_truth_dir_without_truth_files(recon_nolabels, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("evaluate", recon_nolabels["plain_nolabels"], "--truth", empty, "--out", tmp_path / "report")
    assert_one_line_error(result, str(empty), "no truth files")
