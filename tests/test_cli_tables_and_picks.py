"""Victims that span the classes (--pick), truth files a shell glob names, and tables at 80 columns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import assert_one_line_error, invoke, invoke_ok, copy_dump
from precode_cli import cli_support, data, fileformat
from precode_cli.errors import UserError
from precode_cli.stages import evaluate

SMALL = ["--model", "mlp", "--width", "8", "--image-size", "8"]


# --- --pick: victims that span the classes ----------------------------------------------------------


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """An ImageFolder set: 3 classes x 4 images, every image different."""
    root = tmp_path_factory.mktemp("folder")
    for c, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8), (40 + 70 * c, 30 * i, 200 - 60 * c)).save(root / name / f"{i}.png")
    return root


def capture(folder: Path, out: Path, *extra: object) -> list[fileformat.StoredFile]:
    invoke_ok("capture-gradients", *SMALL, "--dataset", "imagefolder", "--data-dir", folder, "--split", "all",
              "--indices", "0:4", *extra, "--out", out)
    return [fileformat.read(p, "truth") for p in sorted(out.glob("*.truth.safetensors"))]


def test_pick_random_spans_classes_and_records_real_positions(class_folder, tmp_path):
    truths = capture(class_folder, tmp_path / "g1", "--pick", "random", "--seed", 3)
    split = data.load("imagefolder", "all", class_folder, image_size=8)
    indices = [i for t in truths for i in t.tensors["indices"].tolist()]
    labels = {int(label) for t in truths for label in t.tensors["labels"]}
    assert len(set(indices)) == 4 and len(labels) > 1, (indices, labels)
    for truth in truths:
        assert truth.meta["pick"] == "random"
        positions = truth.tensors["indices"]
        assert torch.equal(truth.tensors["images"], split.images[positions])  # the real positions in the split
        assert torch.equal(truth.tensors["labels"], split.labels[positions])
    again = capture(class_folder, tmp_path / "g2", "--pick", "random", "--seed", 3)
    assert [t.tensors["indices"].tolist() for t in again] == [t.tensors["indices"].tolist() for t in truths]


def test_pick_first_is_unchanged(class_folder, tmp_path):
    truths = capture(class_folder, tmp_path / "g")
    assert [t.tensors["indices"].tolist() for t in truths] == [[0], [1], [2], [3]]
    assert {int(t.tensors["labels"][0]) for t in truths} == {0}  # a class-sorted folder: all of the first class
    assert all(t.meta["pick"] == "first" and t.meta["indices"] == [i, i + 1] for i, t in enumerate(truths))


def test_pick_must_be_first_or_random(tmp_path):
    result = invoke("capture-gradients", *SMALL, "--indices", "0:1", "--pick", "shuffle", "--out", tmp_path / "g")
    assert result.exit_code == 2 and "shuffle" in result.output


def test_random_truth_indices_must_be_distinct(class_folder, tmp_path):
    capture(class_folder, tmp_path / "g", "--pick", "random", "--batch-size", 2)
    path = sorted((tmp_path / "g").glob("*.truth.safetensors"))[0]
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["indices"] = torch.tensor([5, 5])
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(UserError, match="not distinct"):
        fileformat.read(path, "truth")


# --- attack: truth files that a glob names ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_grads(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "grads"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:2", "--out", out)
    return out


def test_attack_skips_truth_files_a_glob_names(small_grads, tmp_path, monkeypatch):
    opened: list[str] = []
    for name in ("read", "read_meta", "sha256_of", "tensor_table"):
        original = getattr(fileformat, name)

        def spy(path, *args, _original=original, **kwargs):
            opened.append(Path(path).name)
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(fileformat, name, spy)
    named = sorted(small_grads.glob("*.safetensors"))  # what `precode attack grads/*.safetensors` passes
    assert sum(p.name.endswith(".truth.safetensors") for p in named) == 2
    result = invoke_ok("attack", *named, "--iterations", 1, "--out", tmp_path / "r")
    assert "Skipped 2 truth file(s) (*.truth.safetensors): the attack never opens them." in result.stderr
    assert sorted(p.name for p in (tmp_path / "r").glob("*.safetensors")) == ["train-000000.safetensors",
                                                                            "train-000001.safetensors"]
    assert opened and not [name for name in opened if name.endswith(".truth.safetensors")]


def test_attack_on_truth_files_only_and_renamed_truth_are_refused(small_grads, tmp_path):
    truth = small_grads / "train-000000.truth.safetensors"
    assert_one_line_error(invoke("attack", truth, "--iterations", 1, "--out", tmp_path / "r"), str(truth), "truth file")
    renamed = tmp_path / "looks-like-a-dump.safetensors"
    shutil.copy2(truth, renamed)
    result = invoke("attack", small_grads / "train-000000.safetensors", renamed, "--iterations", 1,
                    "--out", tmp_path / "r")
    assert_one_line_error(result, str(renamed), "truth file", "not a gradient dump")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("*.safetensors"))


# --- the evaluation table ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_groups(small_grads, tmp_path_factory) -> list[Path]:
    """Two RECON_DIRs of the same model, defense and attack that differ only in their folders."""
    root = tmp_path_factory.mktemp("groups")
    dirs = [root / "sweep-a" / "recon", root / "sweep-b" / "recon"]
    for d in dirs:
        invoke_ok("attack", small_grads, "--iterations", 1, "--out", d)
    return dirs


def run_evaluate(dirs: list[Path], truth: Path, out: Path, width: int, monkeypatch) -> tuple[str, dict]:
    monkeypatch.setattr(cli_support.stdout, "width", width)
    result = invoke_ok("evaluate", *dirs, "--truth", truth, "--out", out)
    return result.stdout, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("width", [80, 100, 120, 160])
def test_evaluation_table_fits_and_tells_groups_apart(two_groups, small_grads, tmp_path, monkeypatch, width):
    text, document = run_evaluate(two_groups, small_grads, tmp_path / "rep", width, monkeypatch)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, text
    assert "…" not in text, text  # nothing cut: short labels need no shortening
    for group in document["groups"]:
        s = group["summary"]
        for value in (f"{s['mean_ssim']:.4f}", f"{s['mean_psnr']:.2f}", f"{s['mean_mse']:.5f}", "untrained"):
            assert value in text, (value, text)
    first_cells = [line.strip("│┃ ").split()[0] for line in lines if "sweep-" in line]
    assert len(first_cells) == 2 and first_cells[0] != first_cells[1], text
    assert first_cells[0].endswith("sweep-a/recon") and first_cells[1].endswith("sweep-b/recon"), text
    assert len({g["name"] for g in document["groups"]}) == 2  # the report's names differ too


def test_evaluation_at_80_columns_is_one_block_per_group(two_groups, small_grads, tmp_path, monkeypatch):
    text, _ = run_evaluate(two_groups, small_grads, tmp_path / "rep", 80, monkeypatch)
    assert "┃" not in text and "model mlp (untrained) · defense none · attack ig" in text, text
    assert text.count("mean SSIM") == 2 and text.count("label acc") == 2


def test_long_folder_names_stay_whole_at_80_columns(two_groups, small_grads, tmp_path, monkeypatch):
    long_dirs = []
    for d in two_groups:
        target = tmp_path / f"an-experiment-with-a-rather-long-name-{d.parent.name}" / "reconstructions"
        shutil.copytree(d, target)
        long_dirs.append(target)
    text, _ = run_evaluate(long_dirs, small_grads, tmp_path / "rep", 80, monkeypatch)
    ending = f"{long_dirs[0].parent.name}/reconstructions"
    assert any(line.endswith(ending) and "·" not in line for line in text.splitlines()), text  # on its own line
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text


def test_group_labels():
    assert evaluate.group_labels(["recon/mlp", "recon/mlp-precode"]) == ["recon/mlp", "recon/mlp-precode"]
    assert evaluate.group_labels(["/a/long/path/x/a/r", "/a/long/path/x/b/r", "r1"], 12) == ["a/r", "b/r", "r1"]
    assert evaluate.unique_endings(["x/a/r", "x/b/r", "r1"]) == ["a/r", "b/r", "r1"]
    assert evaluate.unique_endings(["r", "a/r"]) == ["r", "a/r"]
    assert evaluate.group_labels(["x/r", "x/r"]) == ["x/r #1", "x/r #2"]
    assert evaluate.unique_endings(["x/r", "x/r"]) == ["r #1", "r #2"]
    long = "a" * 40
    fitted = evaluate._fitted_labels([long + "-1", long + "-2"], evaluate.LABEL_MAX)
    assert all(len(f) == evaluate.LABEL_MAX and f.startswith("…") for f in fitted) and fitted[0] != fitted[1]


def test_attack_table_folds_long_dump_names(small_grads, tmp_path, monkeypatch):
    grads = tmp_path / "g"
    grads.mkdir()
    name = "a-dump-with-a-long-name-from-an-experiment-sweep-train-000000.safetensors"
    copy_dump(small_grads / "train-000000.safetensors", grads / name)  # with states/
    monkeypatch.setattr(cli_support.stdout, "width", 80)
    result = invoke_ok("attack", grads, "--iterations", 1, "--out", tmp_path / "r")
    assert "…" not in result.stdout and max(len(line) for line in result.stdout.splitlines()) <= 80
    folded = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert name in "".join(folded)
