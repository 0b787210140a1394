"""The whole pipeline through the command line, --config files, help, version and import weight."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from helpers import DUMP0, TRUTH0, VICTIM_LABELS, invoke, invoke_ok
from precode_cli import __version__, fileformat

COMMANDS = ["train", "capture-gradients", "attack", "evaluate"]
SUMMARY_KEYS = {"n", "mean_ssim", "mean_psnr", "mean_mse", "asr", "label_accuracy"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """train -> capture-gradients -> attack -> evaluate for the MLP without and with PRECODE, 1 victim each."""
    root = tmp_path_factory.mktemp("pipeline")
    for defense in ("none", "precode"):
        run, grads, recon = root / f"run-{defense}", root / f"grads-{defense}", root / f"recon-{defense}"
        k = ["--precode-k", 64] if defense == "precode" else []
        invoke_ok("train", "--model", "mlp", "--defense", defense, "--epochs", 1, "--batch-size", 128, *k,
                  "--seed", 0, "--out", run)
        invoke_ok("capture-gradients", run, "--indices", "0:1", "--out", grads)
        invoke_ok("attack", grads, "--iterations", 4, "--out", recon)
    report = root / "report"
    result = invoke_ok("evaluate", root / "recon-none", root / "recon-precode",
                       "--truth", root / "grads-none", "--truth", root / "grads-precode", "--out", report)
    return root, result


def test_train_writes_the_run(pipeline):
    root, _ = pipeline
    for defense in ("none", "precode"):
        run = root / f"run-{defense}"
        assert sorted(p.name for p in run.iterdir()) == [
            ".precode.lock", "checkpoints", "curves.png", "history.json", "model.safetensors", "run.yaml"]
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["resume.safetensors"]
        model = fileformat.read(run / "model.safetensors", "model")
        assert model.meta["model"]["name"] == "mlp"
        assert [d["name"] for d in model.meta["defense"]] == ([] if defense == "none" else ["precode"])
        assert model.meta["train"]["epochs"] == 1
        has_vb = any(".bottleneck." in name for name in model.tensors)
        assert has_vb == (defense == "precode")
        config = yaml.safe_load((run / "run.yaml").read_text())
        assert config["command"] == "train"
        assert config["options"]["defense"] == ([] if defense == "none" else [defense]) and config["options"]["epochs"] == 1
        history = json.loads((run / "history.json").read_text())
        assert [row["epoch"] for row in history["epochs"]] == [1]
        row = history["epochs"][0]
        assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy"} <= set(row)
        assert row["test_accuracy"] > 0.5  # one epoch on the built-in data is far above chance (0.1)


def test_capture_writes_dump_and_truth(pipeline):
    root, _ = pipeline
    for defense in ("none", "precode"):
        grads = root / f"grads-{defense}"
        assert sorted(p.name for p in grads.iterdir()) == [".precode.lock", "states", DUMP0, TRUTH0]
        assert len(list((grads / "states").iterdir())) == 1  # the model state, once
        dump = fileformat.read(grads / DUMP0, "gradients")
        assert dump.meta["capture"]["source"] == "run" and dump.meta["capture"]["epoch"] == 1
        assert dump.tensors["labels"].tolist() == [VICTIM_LABELS[0]]
        truth = fileformat.read(grads / TRUTH0, "truth")
        assert truth.tensors["images"].shape == (1, 3, 32, 32)
        assert truth.meta["dump"]["sha256"] == fileformat.sha256_of(grads / DUMP0)
        # The trained weights are what the server sees.
        model = fileformat.read(root / f"run-{defense}" / "model.safetensors", "model")
        for name, tensor in model.tensors.items():
            if f"param.{name}" in dump.tensors:
                assert (dump.tensors[f"param.{name}"] == tensor).all(), name


def test_attack_writes_reconstructions(pipeline):
    root, _ = pipeline
    for defense in ("none", "precode"):
        recon_dir = root / f"recon-{defense}"
        assert sorted(p.name for p in recon_dir.iterdir()) == [".precode.lock", DUMP0]
        recon = fileformat.read(recon_dir / DUMP0, "reconstruction")
        assert recon.tensors["images"].shape == (1, 3, 32, 32)
        assert recon.meta["attack"]["name"] == "ig" and recon.meta["attack"]["params"]["iterations"] == 4
        assert recon.meta["source"] == {"file": DUMP0, "sha256": fileformat.sha256_of(root / f"grads-{defense}" / DUMP0)}


def test_evaluate_writes_the_report(pipeline):
    root, result = pipeline
    report = root / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        ".precode.lock", "grid.png", "metrics.csv", "metrics.json", "report.md", "ssim_hist.png"]
    document = json.loads((report / "metrics.json").read_text())
    assert SUMMARY_KEYS <= set(document["summary"])
    assert document["summary"]["n"] == 2
    assert len(document["groups"]) == 2
    assert [g["defense"] for g in document["groups"]] == ["none", "precode"]
    for group in document["groups"]:
        assert SUMMARY_KEYS <= set(group["summary"]) and group["summary"]["n"] == 1
    rows = document["per_victim"]
    assert len(rows) == 2
    for row in rows:
        assert {"ssim", "psnr", "mse", "true_label", "recon_label", "dataset_index", "success"} <= set(row)
        assert row["true_label"] == VICTIM_LABELS[0] and row["recon_label"] == VICTIM_LABELS[0]
        assert -1 <= row["ssim"] <= 1 and row["mse"] >= 0
    assert document["summary"]["label_accuracy"] == 1.0

    with open(report / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 2 and {"ssim", "psnr", "mse", "group"} <= set(csv_rows[0])

    with Image.open(report / "grid.png") as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 96 and image.height > 2 * 96

    markdown = (report / "report.md").read_text()
    assert markdown.startswith("# ") and "grid.png" in markdown and "precode" in markdown
    assert "mean SSIM" in result.stdout  # the table goes to stdout


def test_config_file_sets_options_and_the_command_line_wins(dumps, tmp_path):
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({"iterations": 3, "seed": 7, "tv-weight": 0.5, "out": str(tmp_path / "r1")}))
    invoke_ok("attack", dumps["plain"] / DUMP0, "--config", config)
    recon = fileformat.read(tmp_path / "r1" / DUMP0, "reconstruction")
    assert recon.meta["attack"]["params"]["iterations"] == 3
    assert recon.meta["attack"]["seed"] == 7
    assert recon.meta["attack"]["params"]["tv_weight"] == 0.5

    invoke_ok("attack", dumps["plain"] / DUMP0, "--config", config, "--iterations", 2, "--out", tmp_path / "r2")
    recon = fileformat.read(tmp_path / "r2" / DUMP0, "reconstruction")
    assert recon.meta["attack"]["params"]["iterations"] == 2  # command line wins
    assert recon.meta["attack"]["seed"] == 7  # the rest still comes from the file
    assert recon.tensors["loss_trace"].shape == (2,)


def test_config_file_for_capture(tmp_path):
    config = tmp_path / "capture.yaml"
    config.write_text("indices: '0:3'\nseed: 5\nshare-labels: false\n")
    invoke_ok("capture-gradients", "--config", config, "--indices", "1:2", "--out", tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        ".precode.lock", "states", "train-000001.safetensors", "train-000001.truth.safetensors"]
    dump = fileformat.read(tmp_path / "g" / "train-000001.safetensors", "gradients")
    assert dump.meta["capture"]["seed"] == 5
    assert "labels" not in dump.tensors


def test_config_file_positional_arguments_and_spellings(dumps, tmp_path):
    """Positional arguments have keys too; dashes and underscores are interchangeable; order does not matter."""
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({
        "dumps": [str(dumps["plain"] / DUMP0)], "tv_weight": 0.25, "iterations": 5, "out": str(tmp_path / "r"),
    }))
    invoke_ok("attack", "--iterations", 1, "--config", config)  # the command line wins even when it comes first
    recon = fileformat.read(tmp_path / "r" / DUMP0, "reconstruction")
    assert recon.meta["attack"]["params"]["iterations"] == 1
    assert recon.meta["attack"]["params"]["tv_weight"] == 0.25


def test_empty_config_file_is_accepted(dumps, tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("")
    invoke_ok("attack", dumps["plain"] / DUMP0, "--config", config, "--iterations", 1, "--out", tmp_path / "r")
    assert (tmp_path / "r" / DUMP0).is_file()


@pytest.mark.parametrize("key", ["help", "config"])
def test_config_file_may_not_set_help_or_config(tmp_path, key):
    config = tmp_path / "bad.yaml"
    config.write_text(f"{key}: x\n")
    result = invoke("attack", tmp_path / "x.safetensors", "--config", config, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert repr(key) in result.output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("iterations: 3\nmagic-number: 42\n", "magic-number", id="unknown-key"),
        pytest.param("iterations: 0\n", "--iterations", id="value-checked-like-the-command-line"),
        pytest.param("- iterations\n- 3\n", "mapping", id="not-a-mapping"),
        pytest.param("iterations: [unclosed\n", "not valid YAML", id="invalid-yaml"),
    ],
)
def test_bad_config_file_is_a_usage_error(tmp_path, content, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = invoke("attack", tmp_path / "x.safetensors", "--config", config, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_bad_option_value_is_a_usage_error(tmp_path):
    result = invoke("attack", tmp_path / "x.safetensors", "--iterations", "many", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "--iterations" in result.output
    result = invoke("capture-gradients", "--indices", "5:2", "--out", tmp_path / "g")
    assert result.exit_code == 2 and "--indices" in result.stderr
    result = invoke("capture-gradients", "--mode", "sideways", "--out", tmp_path / "g")
    assert result.exit_code == 2 and "--mode" in result.stderr
    assert not (tmp_path / "g").exists()


def test_top_level_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    assert "Example:" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "--out" in result.output
    assert f"precode {command}" in result.output


def test_no_arguments_shows_help():
    result = invoke()
    assert result.exit_code == 2  # docs/cli.md: "prints the help and exits with code 2"
    assert "Usage" in result.output
    for command in COMMANDS:
        assert command in result.output


def test_importing_the_app_does_not_import_torch():
    code = (
        "import sys\n"
        "import precode_cli.app\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'torchmetrics') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout
    # Sanity check of the probe itself: importing a stage does pull torch in.
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, precode_cli.stages.attack; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.strip() == "True", proc.stderr


def test_version():
    proc = subprocess.run([sys.executable, "-m", "precode_cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"precode {__version__}"
    assert __version__.count(".") == 2


def test_streams_force_and_last_smaller_batch(tmp_path):
    """Batches of 2 over 3 victims; tables on stdout, status on stderr; --note; --force keeps other files."""
    grads, recon, report = tmp_path / "g", tmp_path / "r", tmp_path / "rep"
    result = invoke_ok("capture-gradients", "--indices", "0:3", "--batch-size", 2, "--out", grads)
    assert "Wrote" in result.stderr and "Wrote" not in result.stdout
    assert sorted(p.name for p in grads.iterdir()) == [
        ".precode.lock", "states", "train-000000.safetensors", "train-000000.truth.safetensors",
        "train-000002.safetensors", "train-000002.truth.safetensors",
    ]
    assert len(list((grads / "states").iterdir())) == 1  # both dumps share one model state
    last = fileformat.read(grads / "train-000002.safetensors", "gradients")
    assert last.tensors["labels"].shape == (1,) and last.meta["data"]["batch_size"] == 1
    assert fileformat.read(grads / "train-000000.truth.safetensors", "truth").tensors["indices"].tolist() == [0, 1]

    result = invoke_ok("attack", grads, "--iterations", 1, "--out", recon)
    assert "final matching loss" in result.stdout and "final matching loss" not in result.stderr
    assert fileformat.read(recon / "train-000000.safetensors", "reconstruction").tensors["images"].shape == (2, 3, 32, 32)
    assert fileformat.read(recon / "train-000002.safetensors", "reconstruction").tensors["images"].shape == (1, 3, 32, 32)

    note = "A note for the top of the report."
    result = invoke_ok("evaluate", recon, "--truth", grads, "--note", note, "--out", report)
    assert "mean SSIM" in result.stdout and "Wrote" in result.stderr and "Wrote" not in result.stdout
    document = json.loads((report / "metrics.json").read_text())
    assert document["summary"]["n"] == 3
    assert sorted(row["dataset_index"] for row in document["per_victim"]) == [0, 1, 2]
    assert note in (report / "report.md").read_text()

    (report / "keep-me.txt").write_text("mine")
    invoke_ok("evaluate", recon, "--truth", grads, "--out", report, "--force")
    assert (report / "keep-me.txt").read_text() == "mine"
    assert note not in (report / "report.md").read_text()  # the report was rewritten


def test_same_seed_gives_identical_capture_and_training(tmp_path):
    """PRECODE samples noise in every forward pass; the seed must fix it, and training's shuffling too."""
    for out, seed in (("a", 5), ("b", 5), ("c", 6)):
        invoke_ok("capture-gradients", "--defense", "precode", "--indices", "0:1", "--seed", seed,
                  "--out", tmp_path / out)
    a, b, c = (fileformat.read(tmp_path / out / "train-000000.safetensors", "gradients") for out in "abc")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not torch.equal(a.tensors["grad.features.1.weight"], c.tensors["grad.features.1.weight"])

    for out in ("run-a", "run-b"):
        invoke_ok("train", "--defense", "precode", "--epochs", 1, "--batch-size", 256, "--seed", 2,
                  "--out", tmp_path / out)
    first, second = (fileformat.read(tmp_path / out / "model.safetensors", "model") for out in ("run-a", "run-b"))
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
