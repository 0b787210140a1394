"""Datasets: the built-in one (deterministic, balanced) and the imagefolder loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, invoke
from precode_cli import builtin_data, data
from precode_cli.errors import UserError

CLASSES = ["cat", "dog", "emu"]  # folder names, deliberately not in creation order below
SIZES = [(32, 32), (40, 20), (17, 50), (64, 64), (9, 11)]


@pytest.fixture(scope="module")
def builtin_splits():
    return {split: data.load("builtin", split) for split in ("train", "test")}


def test_builtin_is_deterministic(builtin_splits):
    # A fresh generation (not the loader's cache) gives bit-identical tensors.
    for split in ("train", "test"):
        images, labels = builtin_data.generate(split)
        assert torch.equal(images, builtin_splits[split].images)
        assert torch.equal(labels, builtin_splits[split].labels)


@pytest.mark.parametrize("split,n", [("train", 10_000), ("test", 2_000)])
def test_builtin_shape_range_and_balance(builtin_splits, split, n):
    s = builtin_splits[split]
    assert s.images.shape == (n, 3, 32, 32)
    assert s.images.dtype == torch.float32
    assert s.labels.shape == (n,) and s.labels.dtype == torch.int64
    assert s.images.min() >= 0 and s.images.max() <= 1
    assert s.images.std() > 0.1  # not blank
    assert torch.equal(torch.round(s.images * 255) / 255, s.images)  # on the 8-bit grid
    assert s.class_names == builtin_data.CLASS_NAMES and len(s.class_names) == 10
    assert torch.bincount(s.labels, minlength=10).tolist() == [n // 10] * 10


def test_builtin_train_and_test_differ(builtin_splits):
    train, test = builtin_splits["train"], builtin_splits["test"]
    first = train.images[:200].flatten(1)
    others = test.images[:200].flatten(1)
    # No image of the first 200 of test is a copy of one of the first 200 of train.
    assert torch.cdist(first, others).min() > 0.5
    assert not torch.equal(train.labels[:2000], test.labels)


def test_builtin_all_is_train_then_test(builtin_splits):
    everything = data.load("builtin", "all")
    assert len(everything) == 12_000
    assert torch.equal(everything.images[:10_000], builtin_splits["train"].images)
    assert torch.equal(everything.labels[10_000:], builtin_splits["test"].labels)


def test_classes_look_different(builtin_splits):
    """Each class has its own mean colour: a person (and a classifier) can tell them apart."""
    s = builtin_splits["test"]
    means = torch.stack([s.images[s.labels == c].mean(dim=(0, 2, 3)) for c in range(10)])
    assert torch.cdist(means, means).add(torch.eye(10)).min() > 0.01


def test_normalize_round_trip_and_spec(builtin_splits):
    spec = data.data_spec("builtin")
    assert spec["input_shape"] == [3, 32, 32] and spec["num_classes"] == 10
    assert spec["class_names"] == builtin_data.CLASS_NAMES
    x = builtin_splits["test"].images[:16]
    z = data.normalize(x, spec)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.5
    assert torch.allclose(data.denormalize(z, spec), x, atol=1e-6)


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="--dataset"):
        data.load("cifar-1000", "train")
    with pytest.raises(UserError, match="--split"):
        data.load("builtin", "validation")
    with pytest.raises(UserError, match="--data-dir"):
        data.load("imagefolder", "train", None)


# --- imagefolder ------------------------------------------------------------------------------------


def _make_folder(root: Path, seed: int = 0) -> Path:
    """3 classes x 5 PNGs of different sizes; dog/img2.png is grayscale."""
    gen = torch.Generator().manual_seed(seed)
    for cls in reversed(CLASSES):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
            image = Image.fromarray(pixels, "RGB")
            if cls == "dog" and i == 2:
                image = image.convert("L")
            image.save(root / cls / f"img{i}.png")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return _make_folder(tmp_path / "pics")


def test_imagefolder_all(folder):
    s = data.load("imagefolder", "all", folder)
    assert s.images.shape == (15, 3, 32, 32) and s.images.dtype == torch.float32
    assert s.images.min() >= 0 and s.images.max() <= 1
    assert s.class_names == CLASSES
    assert s.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    gray = s.images[5 + 2]  # dog/img2.png
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    colour = s.images[5 + 1]
    assert not torch.equal(colour[0], colour[1])
    # The 32x32 original is not resampled away.
    original = torch.from_numpy(__import__("numpy").array(Image.open(folder / "cat" / "img0.png"))).permute(2, 0, 1)
    assert torch.allclose(s.images[0], original.float() / 255, atol=1e-6)


def _positions(part: torch.Tensor, whole: torch.Tensor) -> list[int]:
    found = []
    for image in part:
        matches = [i for i in range(len(whole)) if torch.equal(image, whole[i])]
        assert len(matches) == 1
        found.append(matches[0])
    return found


def test_imagefolder_splits_partition_all(folder):
    everything = data.load("imagefolder", "all", folder)
    train = data.load("imagefolder", "train", folder)
    test = data.load("imagefolder", "test", folder)
    assert len(train) == 12 and len(test) == 3
    in_train, in_test = _positions(train.images, everything.images), _positions(test.images, everything.images)
    assert set(in_train).isdisjoint(in_test)
    assert sorted(in_train + in_test) == list(range(15))
    assert train.labels.tolist() == everything.labels[in_train].tolist()
    assert test.labels.tolist() == everything.labels[in_test].tolist()
    assert train.class_names == test.class_names == CLASSES


def test_imagefolder_splits_are_deterministic(folder, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(folder, twin)  # another path: nothing comes from a cache
    for split in ("train", "test", "all"):
        a, b = data.load("imagefolder", split, folder), data.load("imagefolder", split, twin)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_imagefolder_train_test_subfolders(tmp_path):
    root = tmp_path / "split"
    _make_folder(root / "train", seed=1)
    _make_folder(root / "test", seed=2)
    train, test = data.load("imagefolder", "train", root), data.load("imagefolder", "test", root)
    assert len(train) == 15 and len(test) == 15
    assert not torch.equal(train.images, test.images)
    assert len(data.load("imagefolder", "all", root)) == 30
    spec = data.data_spec("imagefolder", root)
    assert spec["num_classes"] == 3 and spec["input_shape"] == [3, 32, 32] and spec["class_names"] == CLASSES


def test_imagefolder_corrupt_image_names_the_file(folder):
    bad = folder / "emu" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(UserError) as err:
        data.load("imagefolder", "all", folder)
    assert str(bad) in str(err.value)


def test_imagefolder_corrupt_image_through_the_cli(folder, tmp_path):
    bad = folder / "cat" / "zz-broken.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "run"
    result = invoke("train", "--dataset", "imagefolder", "--data-dir", folder, "--epochs", 0, "--out", out)
    assert_one_line_error(result, str(bad), "not a readable image")
    assert not (out / "model.safetensors").exists()


def test_imagefolder_missing_or_empty_folder(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        data.load("imagefolder", "all", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--data-dir"):
        data.load("imagefolder", "all", tmp_path / "empty")


def test_imagefolder_test_folder_missing_a_class(tmp_path):
    """DIR/test lacks a class of DIR/train: labels must still mean the same classes, or a clear refusal.

    The model's classes are the training folder's; a test image of 'emu' must carry emu's label
    there (2), never another class's.
    """
    root = tmp_path / "uneven"
    for split, classes in (("train", ["cat", "dog", "emu"]), ("test", ["cat", "emu"])):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                value = 40 * (1 + ["cat", "dog", "emu"].index(cls)) + i + (100 if split == "test" else 0)
                Image.new("RGB", (8, 8), (value, value, value)).save(root / split / cls / f"{i}.png")
    for split in ("test", "all"):
        try:
            s = data.load("imagefolder", split, root)
        except UserError as err:
            assert "test" in str(err) and "dog" in str(err), str(err)
            continue
        assert s.class_names == ["cat", "dog", "emu"], (split, s.class_names)
        test_part = s.labels[-4:]  # the test images come last in 'all' and are all of 'test'
        assert test_part.tolist() == [0, 0, 2, 2], (split, s.labels.tolist())
