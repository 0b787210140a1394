"""Training: checkpoints and capture from them, resuming to the same result, refusals that leave a run
untouched, optimisers, weight decay, history and curves, device choice."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from helpers import DUMP0, assert_one_line_error, invoke, invoke_ok, tree_digest
from precode_cli import fileformat, models

# A tiny, fast run: 160 training and 40 test images of 3 x 12 x 12 pixels, 5 steps per epoch.
SMALL_OPTIONS = {"--dataset": "tensors", "--model": "mlp", "--width": 16, "--batch-size": 32, "--seed": 0}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    """A --dataset tensors file of four learnable classes (a colour each, plus noise)."""
    path = tmp_path_factory.mktemp("data") / "tiny.safetensors"
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=torch.float32)
    noise = torch.randint(-40, 41, (200, 3, 12, 12), generator=gen).float()
    images = (colours[labels].view(200, 3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    save_file({"images": images, "labels": labels}, str(path), metadata={"classes": "red,green,blue,yellow"})
    return str(path)


@pytest.fixture(scope="module")
def small(tiny_data):
    """The options of a small run on the tiny data, some changed: small(lr=0.01) adds or replaces --lr."""

    def options(**changes) -> list:
        merged = {**SMALL_OPTIONS, "--data-dir": tiny_data,
                  **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
        return [item for pair in merged.items() for item in pair]

    return options


TIMING = ("seconds", "step_seconds_median")


def _tensors(path):
    return fileformat.read(path, "model").tensors


def _equal_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, small):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    invoke_ok("train", *small(), "--epochs", 2, "--checkpoint-epochs", 1, "--out", run)
    return run


def test_checkpoints_are_written_every_epoch(checkpointed):
    run = checkpointed
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch-0000.safetensors", "epoch-0001.safetensors", "epoch-0002.safetensors", "resume.safetensors"]
    stored = [fileformat.read(run / "checkpoints" / f"epoch-{n:04d}.safetensors", "model") for n in range(3)]
    assert [s.meta["train"]["epoch"] for s in stored] == [0, 1, 2]
    assert "test_accuracy" not in stored[0].meta["train"] and 0 <= stored[1].meta["train"]["test_accuracy"] <= 1
    assert all(s.meta["model"] == stored[0].meta["model"] for s in stored)
    final = fileformat.read(run / "model.safetensors", "model")
    assert final.meta["train"]["epoch"] == 2
    assert _equal_tensors(stored[2].tensors, final.tensors)
    assert not torch.equal(stored[0].tensors["classifier.weight"], stored[1].tensors["classifier.weight"])
    assert not torch.equal(stored[1].tensors["classifier.weight"], stored[2].tensors["classifier.weight"])
    # Epoch 0 is the initial model: the one the seed builds.
    torch.manual_seed(0)
    initial = models.build(stored[0].meta["model"])
    assert _equal_tensors(initial.state_dict(), stored[0].tensors)

    state = fileformat.read(run / "checkpoints" / "resume.safetensors", "training-state")
    assert state.meta["train"]["epoch"] == 2 and [row["epoch"] for row in state.meta["train"]["history"]] == [1, 2]
    assert {"rng.shuffle", "rng.torch"} <= state.tensors.keys()
    assert _equal_tensors(state.prefixed("model"), final.tensors)
    assert any(name.startswith("optimizer.") and name.endswith(".exp_avg") for name in state.tensors)  # Adam moments
    with pytest.raises(Exception, match="training state"):
        fileformat.read(run / "checkpoints" / "resume.safetensors", "model")


@pytest.mark.parametrize("epoch", [0, 1, None])
def test_capture_from_a_checkpoint_uses_its_weights(checkpointed, tmp_path, epoch):
    extra = [] if epoch is None else ["--epoch", epoch]
    invoke_ok("capture-gradients", checkpointed, *extra, "--indices", "0:1", "--out", tmp_path / "g")
    dump = fileformat.read(tmp_path / "g" / DUMP0, "gradients")
    source = checkpointed / ("model.safetensors" if epoch is None else f"checkpoints/epoch-{epoch:04d}.safetensors")
    assert _equal_tensors(dump.prefixed("param"), _tensors(source))
    assert dump.meta["capture"]["epoch"] == (2 if epoch is None else epoch)
    assert dump.meta["capture"]["source"] == "run"


def test_capture_from_a_missing_epoch_names_the_kept_ones(checkpointed, tmp_path):
    result = invoke("capture-gradients", checkpointed, "--epoch", 5, "--indices", "0:1", "--out", tmp_path / "g")
    assert_one_line_error(result, "no checkpoint of epoch 5", "it keeps epochs 0, 1, 2")
    assert not (tmp_path / "g").exists()


def test_kept_epochs_are_listed_in_numeric_order(tmp_path, small):
    run = tmp_path / "run"
    invoke_ok("train", *small(width=4, subset=8, batch_size=8), "--epochs", 10, "--checkpoint-epochs", 5, "--out", run)
    result = invoke("capture-gradients", run, "--epoch", 3, "--indices", "0:1", "--out", tmp_path / "g")
    assert_one_line_error(result, "it keeps epochs 0, 5, 10.")


# --- resume --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("defense,optimizer", [("none", "adam"), ("precode", "sgd"), ("precode,noise", "adam"),
                                               ("dp", "sgd")])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, small, defense, optimizer):
    """Also with defenses that draw noise in every step (noise, dp): resume restores their generator."""
    k = {"precode_k": 8} if "precode" in defense else {}
    args = small(defense=defense, **k, optimizer=optimizer, lr=0.01)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    invoke_ok("train", *args, "--epochs", 2, "--out", straight)
    invoke_ok("train", *args, "--epochs", 1, "--out", resumed)
    after_one = _tensors(resumed / "model.safetensors")
    invoke_ok("train", *args, "--epochs", 2, "--resume", "--out", resumed)

    a, b = _tensors(straight / "model.safetensors"), _tensors(resumed / "model.safetensors")
    assert _equal_tensors(a, b)
    assert not _equal_tensors(a, after_one)  # the second epoch did train
    if defense == "precode":
        assert any(".bottleneck." in name for name in a)
    rows_a = json.loads((straight / "history.json").read_text())["epochs"]
    rows_b = json.loads((resumed / "history.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows_b] == [1, 2]
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING} for row in rows]
    assert strip(rows_a) == strip(rows_b)
    state_a = fileformat.read(straight / "checkpoints" / "resume.safetensors", "training-state").tensors
    state_b = fileformat.read(resumed / "checkpoints" / "resume.safetensors", "training-state").tensors
    assert _equal_tensors(state_a, state_b)  # weights, optimiser moments and random generators
    assert fileformat.read(resumed / "model.safetensors", "model").meta["train"]["epoch"] == 2


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, small):
    run = tmp_path_factory.mktemp("base") / "run"
    invoke_ok("train", *small(), "--epochs", 1, "--checkpoint-epochs", 1, "--out", run)
    return run


@pytest.fixture
def run_copy(one_epoch_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(one_epoch_run, target)
    return target


@pytest.mark.parametrize("changes,args,phrases", [
    ({"lr": 0.01}, ["--epochs", 2, "--resume"], ["--resume continues the run", "--lr 0.001 -> 0.01"]),
    ({"width": 32}, ["--epochs", 2, "--resume"], ["--width 16 -> 32"]),
    ({}, ["--epochs", 2], ["holds a training run", "--resume", "--force"]),
    ({}, ["--epochs", 1, "--resume"], ["has already trained 1 epochs", "raise --epochs"]),
    ({}, ["--epochs", 0, "--resume"], ["has already trained 1 epochs"]),
], ids=["other-lr", "other-width", "no-resume-or-force", "epochs-equal", "epochs-below"])
def test_refusals_leave_the_run_untouched(run_copy, small, changes, args, phrases):
    before = tree_digest(run_copy)
    result = invoke("train", *small(**changes), *args, "--out", run_copy)
    assert_one_line_error(result, *phrases)
    assert tree_digest(run_copy) == before


def test_resume_without_a_run(tmp_path, small):
    result = invoke("train", *small(), "--epochs", 2, "--resume", "--out", tmp_path / "run")
    assert_one_line_error(result, "nothing to resume", "start without --resume")
    assert not (tmp_path / "run").exists()


def test_force_starts_over_and_drops_old_checkpoints(run_copy, small):
    invoke_ok("train", *small(), "--epochs", 1, "--force", "--out", run_copy)
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["resume.safetensors"]
    assert json.loads((run_copy / "history.json").read_text())["epochs"][0]["epoch"] == 1


# --- optimisers, history, curves -----------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.003)])
def test_optimizer_reduces_the_training_loss(tmp_path, optimizer, lr):
    run = tmp_path / "run"
    args = ["--model", "mlp", "--width", 32, "--subset", 256, "--batch-size", 64, "--optimizer", optimizer,
            "--lr", lr, "--epochs", 2, "--seed", 1]
    invoke_ok("train", *args, "--weight-decay", 1e-4, "--out", run)
    history = json.loads((run / "history.json").read_text())
    rows = history["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[0]["train_loss"] < 2.3  # ln(10) = 2.30: a guess on ten classes
    assert rows[1]["train_loss"] < 0.75 * rows[0]["train_loss"]
    assert rows[1]["test_loss"] < rows[0]["test_loss"] and rows[1]["test_accuracy"] > 0.5  # chance is 0.1
    assert history["test_accuracy"] == rows[-1]["test_accuracy"]
    for row in rows:
        assert 0 < row["step_seconds_median"] <= row["seconds"]
        assert 0 <= row["train_accuracy"] <= 1 and row["test_loss"] > 0
    assert history["options"]["weight_decay"] == 1e-4 and history["options"]["optimizer"] == optimizer
    meta = fileformat.read(run / "model.safetensors", "model").meta["train"]
    assert meta["weight_decay"] == 1e-4 and meta["optimizer"] == optimizer and meta["lr"] == lr
    assert meta["test_accuracy"] == rows[-1]["test_accuracy"]
    assert yaml.safe_load((run / "run.yaml").read_text())["options"]["weight_decay"] == 1e-4

    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and 400 <= image.width <= 4000 and 150 <= image.height <= image.width

    if optimizer == "sgd":  # the weight decay is applied, not only recorded
        invoke_ok("train", *args, "--weight-decay", 0.0, "--out", tmp_path / "no-decay")
        with_decay, without = _tensors(run / "model.safetensors"), _tensors(tmp_path / "no-decay" / "model.safetensors")
        assert not torch.equal(with_decay["features.1.weight"], without["features.1.weight"])
        assert with_decay["features.1.weight"].norm() < without["features.1.weight"].norm()


def test_zero_epochs_writes_no_curves(tmp_path, small):
    invoke_ok("train", *small(), "--epochs", 0, "--out", tmp_path / "run")
    assert not (tmp_path / "run" / "curves.png").exists()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["epochs"] == [] and history["test_accuracy"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(tmp_path, small):
    result = invoke("train", *small(), "--epochs", 1, "--device", "cuda", "--out", tmp_path / "run")
    assert_one_line_error(result, "--device cuda", "no CUDA", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_unknown_device(tmp_path, small):
    result = invoke("train", *small(), "--epochs", 1, "--device", "tpu", "--out", tmp_path / "run")
    assert_one_line_error(result, "unknown --device 'tpu'")
    assert not (tmp_path / "run").exists()
