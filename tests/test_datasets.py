"""Dataset loaders in their own on-disk formats (CIFAR pickles, MNIST IDX, image folders, safetensors),
written by the tests themselves: no download, no shared data."""

from __future__ import annotations

import builtins
import gzip
import os
import pickle
import shlex
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from helpers import assert_one_line_error, invoke, invoke_ok
from precode_cli import builtin_data, data, fileformat
from precode_cli.errors import UserError

# --- CIFAR "python version" ------------------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = ["apple", "aquarium_fish", "baby", "bear", "beaver"] + [f"class_{i:02d}" for i in range(5, 100)]
# Published per-channel statistics of the training splits (the literature's rounded values).
PUBLISHED = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


def _py2_pickle(obj) -> bytes:
    """A pickle as Python 2's cPickle (protocol 2) wrote the official CIFAR files: str keys and array data
    as Python 2 byte strings, numpy arrays via numpy.core.multiarray._reconstruct."""
    out = bytearray(b"\x80\x02")

    def string(raw: bytes) -> None:
        out.extend(b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<I", len(raw)) + raw)

    def put(o) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for key, value in o.items():
                put(key)
                put(value)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for value in o:
                put(value)
            out.extend(b"e")
        elif isinstance(o, str):
            string(o.encode("latin1"))
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            out.extend(b"J" + struct.pack("<i", 0) + b"\x85")
            string(b"b")
            out.extend(b"\x87R(")
            put(1)
            out.extend(b"(")
            for size in o.shape:
                put(int(size))
            out.extend(b"tcnumpy\ndtype\n")
            string(b"u1")
            put(0)
            put(1)
            out.extend(b"\x87R(")
            for value in (3, "|", None, None, None, -1, -1, 0):
                put(value)
            out.extend(b"tb")
            put(False)
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    put(obj)
    out.extend(b".")
    return bytes(out)


def _with_bytes_keys(obj):
    """What `pickle.load(f, encoding="bytes")` returns for an original file: bytes keys and names."""
    if isinstance(obj, dict):
        return {key.encode(): _with_bytes_keys(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [v.encode() if isinstance(v, str) else v for v in obj]
    return obj


PICKLERS = {
    "python2-original": _py2_pickle,
    "protocol2-bytes-keys": lambda obj: pickle.dumps(_with_bytes_keys(obj), protocol=2),
    "default-protocol": lambda obj: pickle.dumps(obj),
}
CIFAR_LAYOUT = {
    # name: (folder, train batches, test batches, meta file, meta key, labels key, class names, images per batch)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "label_names", "labels", CIFAR10_NAMES, 2),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels", CIFAR100_NAMES, 4),
}


def _write_cifar(root: Path, name: str, dump=PICKLERS["default-protocol"], seed: int = 0) -> dict:
    """The official layout with a handful of random images; returns what was written, per split."""
    folder, train_files, test_files, meta_file, meta_key, labels_key, names, per_batch = CIFAR_LAYOUT[name]
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True)
    (root / folder / meta_file).write_bytes(dump({meta_key: names, "num_cases_per_batch": per_batch}))
    written = {}
    for split, files in (("train", train_files), ("test", test_files)):
        rows, labels = [], []
        for file_name in files:
            n = per_batch if split == "train" else 3
            batch_rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batch_labels = [int(v) for v in rng.integers(0, len(names), n)]
            batch = {"batch_label": f"{file_name} of 1", "data": batch_rows, labels_key: batch_labels}
            if name == "cifar100":
                batch["coarse_labels"] = [v // 5 for v in batch_labels]
            (root / folder / file_name).write_bytes(dump(batch))
            rows.append(batch_rows)
            labels += batch_labels
        written[split] = (np.concatenate(rows), labels)
    return written


@pytest.mark.parametrize("pickler", list(PICKLERS))
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_the_written_pixels(tmp_path, name, pickler):
    written = _write_cifar(tmp_path, name, PICKLERS[pickler])
    folder, names = CIFAR_LAYOUT[name][0], CIFAR_LAYOUT[name][6]
    for data_dir in (tmp_path, tmp_path / folder):  # the parent folder or the batches folder itself
        for split in ("train", "test"):
            rows, labels = written[split]
            s = data.load(name, split, data_dir)
            assert s.images.shape == (len(rows), 3, 32, 32) and s.images.dtype == torch.float32
            assert s.labels.tolist() == labels and s.labels.dtype == torch.int64
            assert s.class_names == names
            # A data row is the R plane, then the G plane, then the B plane, each row-major 32 x 32.
            for i, (channel, y, x) in enumerate([(0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 17, 2)]):
                i %= len(rows)
                assert s.images[i, channel, y, x] * 255 == pytest.approx(rows[i, channel * 1024 + y * 32 + x], abs=1e-3)
            expected = torch.from_numpy(rows).float().div(255).view(-1, 3, 32, 32)
            assert torch.allclose(s.images, expected, atol=1e-6)
    assert len(data.load(name, "train", tmp_path)) == (10 if name == "cifar10" else 4)
    assert len(data.load(name, "all", tmp_path)) == (13 if name == "cifar10" else 7)


def test_cifar_colour_planes(tmp_path):
    written = _write_cifar(tmp_path, "cifar10")
    rows = written["train"][0]
    rows[0] = np.repeat(np.array([200, 100, 0], dtype=np.uint8), 1024)  # a pure orange image: R, G, B planes
    batch = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    batch["data"] = rows[:2]
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(batch))
    image = data.load("cifar10", "train", tmp_path).images[0]
    assert torch.equal(image[0], torch.full((32, 32), 200 / 255))
    assert torch.equal(image[1], torch.full((32, 32), 100 / 255))
    assert torch.equal(image[2], torch.zeros(32, 32))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_data_spec_uses_published_statistics(tmp_path, name):
    _write_cifar(tmp_path, name)
    spec = data.data_spec(name, tmp_path)
    mean, std = PUBLISHED[name]
    assert spec["stats"] == "published"
    # precode records Inverting Gradients' constants, within 3e-4 of the float64 values in the literature.
    assert spec["mean"] == pytest.approx(mean, abs=4e-4) and spec["std"] == pytest.approx(std, abs=2e-4)
    assert spec["input_shape"] == [3, 32, 32] and spec["num_classes"] == (10 if name == "cifar10" else 100)
    assert spec["dataset"] == name and spec["data_dir"] == str(tmp_path.resolve())
    gray = data.data_spec(name, tmp_path, channels=1)  # converted images: statistics of the training split
    assert gray["stats"] == "training split" and gray["input_shape"] == [1, 32, 32] and len(gray["mean"]) == 1


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("payload", [_System, _Exec], ids=["os.system", "builtins.exec"])
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, payload, where):
    _write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "MARKER-pickle-ran"
    target = tmp_path / "cifar-10-batches-py" / where
    evil = pickle.dumps({"data": payload(marker), "labels": [0, 1], "label_names": payload(marker)}, protocol=2)
    target.write_bytes(evil)
    with pytest.raises(UserError) as err:
        data.load("cifar10", "train", tmp_path)
    assert str(target) in str(err.value) and "safely" in str(err.value)
    assert not marker.exists()
    result = invoke("train", "--dataset", "cifar10", "--data-dir", tmp_path, "--epochs", 0, "--out", tmp_path / "run")
    assert_one_line_error(result, str(target))
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: unpickling it for real does create the marker
    assert marker.exists()


def test_truncated_cifar_batch(tmp_path):
    _write_cifar(tmp_path, "cifar10")
    target = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    target.write_bytes(target.read_bytes()[:3000])
    with pytest.raises(UserError, match="not a CIFAR batch file") as err:
        data.load("cifar10", "train", tmp_path)
    assert str(target) in str(err.value)


def test_cifar_batch_without_data(tmp_path):
    _write_cifar(tmp_path, "cifar100")
    target = tmp_path / "cifar-100-python" / "test"
    target.write_bytes(pickle.dumps({"fine_labels": [0, 1], "filenames": ["a", "b"]}))
    with pytest.raises(UserError, match="has no 'data' entry") as err:
        data.load("cifar100", "test", tmp_path)
    assert str(target) in str(err.value)


def test_cifar_bad_shapes_labels_and_missing_batch(tmp_path):
    _write_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}))
    with pytest.raises(UserError, match=r"uint8 images \[N, 3072\]"):
        data.load("cifar10", "train", tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}))
    with pytest.raises(UserError, match=r"labels outside 0\.\.9"):
        data.load("cifar10", "train", tmp_path)
    (folder / "data_batch_2").unlink()
    with pytest.raises(UserError, match="lacks data_batch_2"):
        data.load("cifar10", "train", tmp_path)


# --- MNIST and Fashion-MNIST IDX -----------------------------------------------------------------------


def _idx(array, magic: bytes | None = None, sizes: list[int] | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    head = magic if magic is not None else struct.pack(">I", 0x00000800 | array.ndim)
    return head + b"".join(struct.pack(">I", n) for n in (sizes or array.shape)) + array.tobytes()


IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _write_idx(folder: Path, gz: bool = False, seed: int = 0, n_train: int = 6, n_test: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 + seed) % 10
        for stem, array in zip(IDX_NAMES[split], (images, labels)):
            raw = _idx(array)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / stem).write_bytes(raw)
        written[split] = (images, labels.tolist())
    return written


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name,sub", [
    ("mnist", ""), ("mnist", "raw"), ("mnist", "MNIST/raw"),
    ("fashion-mnist", ""), ("fashion-mnist", "raw"), ("fashion-mnist", "FashionMNIST/raw"),
])
def test_idx_files_load_where_they_are(tmp_path, name, sub, gz):
    written = _write_idx(tmp_path / sub if sub else tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = written[split]
        s = data.load(name, split, tmp_path)
        assert s.images.shape == (len(images), 1, 28, 28)
        assert torch.equal(s.images[:, 0] * 255, torch.from_numpy(images).float())
        assert s.images[1, 0, 3, 20] * 255 == images[1, 3, 20]  # rows, then columns
        assert s.labels.tolist() == labels
    names = data.load(name, "train", tmp_path).class_names
    assert len(names) == 10
    if name == "mnist":
        assert names == [str(d) for d in range(10)]
    else:
        assert names[0] == "t-shirt/top" and names[9] == "ankle boot"
    spec = data.data_spec(name, tmp_path)
    assert spec["stats"] == "published" and spec["input_shape"] == [1, 28, 28]
    assert spec["mean"] == pytest.approx(PUBLISHED[name][0], abs=2e-4)
    assert spec["std"] == pytest.approx(PUBLISHED[name][1], abs=2e-4)


def test_torchvision_folder_of_the_other_dataset_is_not_used(tmp_path):
    _write_idx(tmp_path / "FashionMNIST" / "raw")
    with pytest.raises(UserError, match="--download"):
        data.load("mnist", "train", tmp_path)


@pytest.mark.parametrize("damage,phrase", [
    ("count", "header says [7, 28, 28]"),
    ("short", "header says [6, 28, 28]"),
    ("little-endian-magic", "not an IDX file of unsigned bytes"),
    ("signed-bytes-magic", "not an IDX file of unsigned bytes"),
    ("labels-magic-as-images", "do not hold matching images"),
], ids=str)
def test_idx_bad_headers_are_refused(tmp_path, damage, phrase):
    written = _write_idx(tmp_path)
    images = written["train"][0]
    target = tmp_path / IDX_NAMES["train"][0]
    if damage == "count":
        target.write_bytes(_idx(images, sizes=[7, 28, 28]))
    elif damage == "short":
        target.write_bytes(_idx(images)[:-28])
    elif damage == "little-endian-magic":
        target.write_bytes(_idx(images, magic=struct.pack("<I", 0x00000803)))
    elif damage == "signed-bytes-magic":
        target.write_bytes(_idx(images, magic=struct.pack(">I", 0x00000903)))
    else:
        target.write_bytes(_idx(images.reshape(-1)))  # 1-d: a labels file where the images should be
    with pytest.raises(UserError) as err:
        data.load("mnist", "train", tmp_path)
    assert phrase in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_idx_missing_test_files(tmp_path):
    _write_idx(tmp_path)
    (tmp_path / IDX_NAMES["test"][1]).unlink()
    with pytest.raises(UserError, match="lacks t10k-labels-idx1-ubyte"):
        data.load("mnist", "train", tmp_path)


def test_idx_corrupt_gzip_is_a_user_error(tmp_path):
    _write_idx(tmp_path, gz=True)
    target = tmp_path / (IDX_NAMES["train"][0] + ".gz")
    raw = bytearray(target.read_bytes())
    raw[10] = 0xFF  # the first deflate block header: BTYPE 11, a reserved block type
    target.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="cannot be read"):
        data.load("mnist", "train", tmp_path)


def test_idx_labels_outside_the_classes_are_refused(tmp_path):
    _write_idx(tmp_path, n_train=4, n_test=2)
    (tmp_path / IDX_NAMES["train"][1]).write_bytes(_idx([1, 12, 3, 4]))
    result = invoke("train", "--dataset", "mnist", "--data-dir", tmp_path, "--model", "lenet", "--epochs", 1,
                    "--out", tmp_path / "run")
    assert_one_line_error(result, "label")


def test_train_on_idx_through_the_cli(tmp_path):
    root = tmp_path / "mnist-files"
    _write_idx(root / "MNIST" / "raw", gz=True, n_train=8, n_test=4)
    run = tmp_path / "run"
    invoke_ok("train", "--dataset", "mnist", "--data-dir", root, "--model", "lenet", "--epochs", 1, "--batch-size", 4,
              "--out", run)
    stored = fileformat.read(run / "model.safetensors", "model")
    spec = stored.meta["data"]
    assert spec["dataset"] == "mnist" and spec["data_dir"] == str(root.resolve())
    assert spec["mean"] == pytest.approx([0.1307], abs=2e-4) and spec["std"] == pytest.approx([0.3081], abs=2e-4)
    assert spec["input_shape"] == [1, 28, 28] and spec["num_classes"] == 10
    assert stored.meta["model"]["input_shape"] == [1, 28, 28]
    assert stored.tensors["features.0.weight"].shape == (12, 1, 5, 5)
    assert stored.meta["train"]["epoch"] == 1


def test_cifar_without_files_mentions_download(tmp_path):
    result = invoke("train", "--dataset", "cifar10", "--epochs", 0, "--out", tmp_path / "a")
    assert_one_line_error(result, "--dataset cifar10 needs --data-dir", "--download")
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--dataset", "cifar10", "--data-dir", tmp_path / "empty", "--epochs", 0,
                    "--out", tmp_path / "b")
    assert_one_line_error(result, "no cifar10 files", str(tmp_path / "empty"), "--download")
    result = invoke("train", "--dataset", "mnist", "--data-dir", tmp_path / "empty", "--epochs", 0,
                    "--out", tmp_path / "c")
    assert_one_line_error(result, "no mnist IDX files", "--download")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# --- imagefolder ---------------------------------------------------------------------------------------


def _solid(path: Path, mode: str, colour, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_imagefolder_all_gray_is_one_channel(tmp_path):
    for i, (cls, value) in enumerate([("a", 10), ("a", 60), ("b", 200), ("b", 250)]):
        _solid(tmp_path / "pics" / cls / f"{i}.png", "L", value, size=(20, 30))
    s = data.load("imagefolder", "all", tmp_path / "pics")
    assert s.images.shape == (4, 1, 32, 32)
    assert [round(float(v) * 255) for v in s.images.mean(dim=(1, 2, 3))] == [10, 60, 200, 250]
    assert data.data_spec("imagefolder", tmp_path / "pics")["input_shape"] == [1, 32, 32]


def test_imagefolder_mixed_is_three_channels_and_channels_one_forces_gray(tmp_path):
    root = tmp_path / "pics"
    _solid(root / "a" / "gray.png", "L", 90)
    _solid(root / "b" / "orange.png", "RGB", (200, 100, 0))
    _solid(root / "b" / "pal.png", "P", 0)  # a palette image counts as colour
    s = data.load("imagefolder", "all", root)
    assert s.images.shape == (3, 3, 32, 32)
    assert torch.allclose(s.images[0], torch.full((3, 32, 32), 90 / 255))
    assert torch.allclose(s.images[1, :, 5, 5], torch.tensor([200, 100, 0]) / 255)
    gray = data.load("imagefolder", "all", root, channels=1)
    assert gray.images.shape == (3, 1, 32, 32)
    luma = (200 * 299 + 100 * 587 + 0 * 114) / 1000  # ITU-R 601, as PIL converts RGB to L
    assert abs(float(gray.images[1, 0, 5, 5]) * 255 - luma) <= 1
    assert abs(float(gray.images[0, 0, 5, 5]) * 255 - 90) <= 0.5
    colour = data.load("imagefolder", "all", tmp_path / "pics", channels=3)
    assert colour.images.shape == (3, 3, 32, 32)


def test_imagefolder_image_size(tmp_path):
    root = tmp_path / "pics"
    for i, cls in enumerate(["x", "y"]):
        _solid(root / cls / "solid.png", "RGB", (30 * i, 100, 250))
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[:, 32:] = 255  # left half black, right half white
        Image.fromarray(pixels).save(root / cls / "halves.png")
    s = data.load("imagefolder", "all", root, image_size=16)
    assert s.images.shape == (4, 3, 16, 16)
    assert torch.allclose(s.images[1, :, 8, 8], torch.tensor([0, 100, 250]) / 255, atol=1e-6)  # x/solid.png
    halves = s.images[0, 0]  # x/halves.png
    assert halves[:, :7].max() < 0.01 and halves[:, 9:].min() > 0.99
    assert data.data_spec("imagefolder", root, image_size=16)["input_shape"] == [3, 16, 16]


def test_imagefolder_train_and_test_folders_share_the_channels(tmp_path):
    root = tmp_path / "split"
    _solid(root / "train" / "a" / "0.png", "L", 20)
    _solid(root / "train" / "b" / "0.png", "L", 40)
    _solid(root / "test" / "a" / "0.png", "RGB", (255, 0, 0))
    _solid(root / "test" / "b" / "0.png", "L", 80)
    train, test = data.load("imagefolder", "train", root), data.load("imagefolder", "test", root)
    assert train.images.shape == (2, 1, 32, 32) and test.images.shape == (2, 1, 32, 32)  # the train split decides
    assert abs(float(test.images[0, 0, 0, 0]) * 255 - 76) <= 1  # red as gray: 0.299 * 255
    assert train.labels.tolist() == test.labels.tolist() == [0, 1]
    assert len(data.load("imagefolder", "all", root)) == 4


# --- tensors -------------------------------------------------------------------------------------------


def _tensors_file(path: Path, n: int = 10, **overrides) -> dict:
    images = torch.arange(n, dtype=torch.uint8).mul(20).view(n, 1, 1, 1).expand(n, 1, 6, 5).contiguous()
    tensors = {"images": images, "labels": torch.arange(n, dtype=torch.int64) % 3}
    tensors.update(overrides)
    tensors = {k: v for k, v in tensors.items() if v is not None}
    save_file(tensors, str(path), metadata={"classes": "a,b,c"})
    return tensors


def test_tensors_file_split_and_classes(tmp_path):
    written = _tensors_file(tmp_path / "set.safetensors")
    everything = data.load("tensors", "all", tmp_path / "set.safetensors")
    assert torch.equal(everything.images, written["images"].float() / 255)
    assert everything.labels.tolist() == written["labels"].tolist() and everything.class_names == ["a", "b", "c"]
    train = data.load("tensors", "train", tmp_path / "set.safetensors")
    test = data.load("tensors", "test", tmp_path / "set.safetensors")
    assert len(train) == 8 and len(test) == 2
    ids = lambda s: [round(float(v) * 255) // 20 for v in s.images[:, 0, 0, 0]]  # each image's own number
    assert sorted(ids(train) + ids(test)) == list(range(10))
    assert train.labels.tolist() == [i % 3 for i in ids(train)] and test.labels.tolist() == [i % 3 for i in ids(test)]
    assert train.class_names == test.class_names == ["a", "b", "c"]
    shutil.copy(tmp_path / "set.safetensors", tmp_path / "twin.safetensors")  # another path: no cache
    again = data.load("tensors", "test", tmp_path / "twin.safetensors")
    assert ids(again) == ids(test)
    spec = data.data_spec("tensors", tmp_path / "set.safetensors")
    assert spec["stats"] == "training split" and spec["input_shape"] == [1, 6, 5] and spec["num_classes"] == 3
    assert spec["mean"][0] == pytest.approx(float(train.images.mean()), abs=1e-5)


def test_tensors_float_images_in_range(tmp_path):
    images = torch.linspace(0, 1, 4 * 3 * 2 * 2).view(4, 3, 2, 2)
    _tensors_file(tmp_path / "f.safetensors", images=images, labels=torch.tensor([0, 1, 2, 0]))
    assert torch.equal(data.load("tensors", "all", tmp_path / "f.safetensors").images, images)


@pytest.mark.parametrize("overrides,phrase", [
    ({"labels": None}, "needs tensors 'images' and 'labels'"),
    ({"images": torch.full((10, 1, 4, 4), 1.5)}, "floats in [0, 1]"),
    ({"images": torch.full((10, 1, 4, 4), -0.1)}, "floats in [0, 1]"),
    ({"labels": torch.full((10,), 0.5)}, "non-negative integers"),
    ({"labels": torch.arange(10) - 1}, "non-negative integers"),
    ({"labels": torch.arange(10)}, "names 3 classes"),
    ({"images": torch.zeros(10, 2, 4, 4, dtype=torch.uint8)}, "[N, 1 or 3, H, W]"),
], ids=["no-labels", "above-1", "below-0", "float-labels", "negative-labels", "too-many-classes", "two-channels"])
def test_tensors_refusals(tmp_path, overrides, phrase):
    _tensors_file(tmp_path / "bad.safetensors", **overrides)
    with pytest.raises(UserError) as err:
        data.load("tensors", "all", tmp_path / "bad.safetensors")
    assert phrase in str(err.value) and str(tmp_path / "bad.safetensors") in str(err.value)


def test_tensors_not_a_file(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        data.load("tensors", "all", tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        data.load("tensors", "all", tmp_path / "junk.safetensors")


# --- conversions on the built-in set, and subsets ------------------------------------------------------


def test_builtin_channels_and_image_size():
    original = data.ImageSet(*builtin_data.generate("test"), [])  # not through the loader's cache
    converted = data.load("builtin", "test", image_size=28, channels=1)
    assert converted.images.shape == (2000, 1, 28, 28) and converted.images.dtype == torch.float32
    assert torch.equal(converted.labels, original.labels)
    luma = (original.images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    expected = F.interpolate(luma, size=(28, 28), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.allclose(converted.images, expected, atol=1e-6)
    assert converted.images.min() >= 0 and converted.images.max() <= 1
    # Resizing keeps each image's brightness.
    assert (converted.images.mean(dim=(1, 2, 3)) - luma.mean(dim=(1, 2, 3))).abs().max() < 0.02
    spec = data.data_spec("builtin", image_size=28, channels=1)
    assert spec["input_shape"] == [1, 28, 28] and spec["stats"] == "training split" and len(spec["mean"]) == 1
    assert spec["image_size"] == 28 and spec["channels"] == 1


def test_conversion_bounds():
    with pytest.raises(UserError, match="--image-size must be between 8 and 512"):
        data.load("builtin", "test", image_size=4)
    with pytest.raises(UserError, match="--channels must be 1 or 3"):
        data.load("builtin", "test", channels=2)


def test_subset_is_a_fixed_choice():
    train = data.load("builtin", "train")
    first, second = data.subset(train, 50), data.subset(train, 50)
    assert len(first) == 50
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    flat = train.images.flatten(1)
    keys = flat.double() @ torch.linspace(1, 2, flat.shape[1], dtype=torch.float64)  # a fingerprint per image
    positions = []
    for image, key in zip(first.images, first.images.flatten(1).double() @ torch.linspace(1, 2, flat.shape[1],
                                                                                       dtype=torch.float64)):
        candidates = torch.nonzero((keys - key).abs() < 1e-6).flatten().tolist()
        matches = [i for i in candidates if torch.equal(train.images[i], image)]
        assert len(matches) == 1
        positions.append(matches[0])
    assert len(set(positions)) == 50 and positions == sorted(positions)
    assert positions != list(range(50))  # a permutation's choice, not the first 50
    assert first.labels.tolist() == train.labels[positions].tolist()
    assert data.subset(train, None) is train and data.subset(train, 10_000) is train
    with pytest.raises(UserError, match="--subset"):
        data.subset(train, 0)
