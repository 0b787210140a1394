"""File format v1: lossless round trips, stable hashes, and refusal of files of another kind."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from helpers import DUMP0, TRUTH0
from precode_cli import factors, fileformat, states
from precode_cli.errors import UserError

KIND_PHRASE = {
    "model": "model file",
    "gradients": "gradient dump",
    "update": "client update",
    "truth": "truth file",
    "reconstruction": "reconstruction",
    "training-state": "training state",
    "attack-state": "attack checkpoint",
    "state": "shared model state",
}


def raw_bits(t: torch.Tensor) -> bytes:
    """The tensor's exact bytes (distinguishes -0.0 from 0.0 and NaN payloads, unlike ==)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.dtype != torch.uint8 else flat.numpy().tobytes()


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
        assert raw_bits(a[name]) == raw_bits(b[name]), name


def minimal_meta(kind: str) -> dict:
    """The required metadata of a kind, with small made-up values."""
    return {key: {"made_up": key} for key in fileformat.REQUIRED_METADATA[kind]}


def hand_made_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    return {
        "grad.a.weight": torch.randn(7, 5, generator=gen),
        "grad.a.bias": torch.tensor([-0.0, 0.0, 1e-38, -3.4e38, 1.0 / 3.0]),
        "param.f64": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "param.f16": torch.randn(4, generator=gen).to(torch.float16),
        "param.bf16": torch.randn(4, generator=gen).to(torch.bfloat16),
        "buffer.count": torch.tensor(17, dtype=torch.int64),  # 0-d
        "buffer.i32": torch.arange(-5, 5, dtype=torch.int32),
        "buffer.u8": torch.arange(0, 256, dtype=torch.uint8),
        "buffer.mask": torch.tensor([True, False, True]),
        "buffer.empty": torch.zeros(0, 3),
        "transposed": torch.arange(12.0).view(3, 4).t(),  # not contiguous on the way in
        "labels": torch.tensor([3], dtype=torch.int64),
    }


def hand_made_meta() -> dict:
    return {
        "model": {"name": "mlp", "kwargs": {}, "input_shape": [3, 32, 32], "num_classes": 10},
        "defense": [{"name": "precode", "params": {"k": 256, "beta": 0.001, "at": None}}],
        "data": {"mean": [0.1, 0.2, 0.30000000000000004], "std": [1e-3, 2.5, 1 / 3], "class_names": ["ä", "日本", "x y"]},
        "loss": {"name": "cross_entropy", "reduction": "mean", "includes_vb_kl": True},
        "capture": {"mode": "train", "seed": 0, "labels_shared": True, "nested": {"deep": [1, [2, [3, None]]]}},
        "extra": "a plain string",
    }


def test_real_dump_round_trip_is_identical(dumps, tmp_path):
    src = dumps["precode"] / DUMP0
    stored = fileformat.read(src, "gradients")
    with safe_open(str(src), framework="pt") as f:
        on_disk = {name: f.get_tensor(name) for name in f.keys()}
        raw_meta = f.metadata()
    assert raw_meta["format"] == "precode-gradients" and raw_meta["format_version"] == "2"
    # What `read` returns is exactly what is on disk, with each factored gradient rebuilt and the tensors of
    # the shared model state the dump names (and only those) added.
    state = src.parent / states.STATES_DIR / f"{json.loads(raw_meta['state'])['sha256']}.safetensors"
    with safe_open(str(state), framework="pt") as f:
        state_tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert any(name.startswith(factors.PREFIX) for name in on_disk)
    assert not any(name.startswith(("param.", "buffer.")) for name in on_disk)
    assert_same_tensors(stored.tensors, {**factors.rebuild_all(on_disk), **state_tensors})
    assert stored.meta == {k: json.loads(v) for k, v in raw_meta.items() if k not in ("format", "format_version")}
    assert any(name.startswith("grad.classifier.bottleneck.") for name in stored.tensors)
    assert stored.tensors["labels"].dtype == torch.int64

    # Written back whole (no `state`, no factors), in either version: read back identical.
    whole = {k: v for k, v in stored.meta.items() if k != "state"}
    for version in (1, 2):
        copy = tmp_path / f"copy-v{version}.safetensors"
        fileformat.write(copy, "gradients", stored.tensors, whole, version=version)
        assert fileformat.read_raw_metadata(copy, "gradients")["format_version"] == str(version)
        again = fileformat.read(copy, "gradients")
        assert again.kind == "gradients"
        assert_same_tensors(again.tensors, stored.tensors)
        assert again.meta == whole


def test_hand_made_round_trip_is_identical(tmp_path):
    tensors, meta = hand_made_tensors(), hand_made_meta()
    path = tmp_path / "sub" / "hand.safetensors"  # the parent folder is created
    fileformat.write(path, "gradients", tensors, meta)
    back = fileformat.read_container(path, "gradients")
    assert_same_tensors(back.tensors, {k: v.contiguous() for k, v in tensors.items()})
    assert back.meta == meta
    assert back.prefixed("grad") == {"a.weight": back.tensors["grad.a.weight"], "a.bias": back.tensors["grad.a.bias"]}
    assert fileformat.read_raw_metadata(path, "gradients")["format_version"] == str(fileformat.FORMAT_VERSION)
    # No temporary file is left beside the result.
    assert [p.name for p in path.parent.iterdir()] == ["hand.safetensors"]


def test_sha256_is_stable_and_matches_the_truth_file(dumps):
    dump = dumps["plain"] / DUMP0
    first = fileformat.sha256_of(dump)
    fileformat.read(dump, "gradients")  # reading does not change the file
    assert fileformat.sha256_of(dump) == first
    assert first == hashlib.sha256(dump.read_bytes()).hexdigest()
    assert len(first) == 64
    truth = fileformat.read(dumps["plain"] / TRUTH0, "truth")
    assert truth.meta["dump"] == {"file": DUMP0, "sha256": first}


def test_sha256_changes_with_one_byte(dump_copy):
    before = fileformat.sha256_of(dump_copy)
    data = bytearray(dump_copy.read_bytes())
    data[-1] ^= 0x01
    dump_copy.write_bytes(bytes(data))
    assert fileformat.sha256_of(dump_copy) != before


@pytest.mark.parametrize("written", sorted(fileformat.FORMAT_NAMES))
def test_reading_another_kind_is_refused_naming_both(tmp_path, written):
    path = tmp_path / f"{written}.safetensors"
    fileformat.write(path, written, {"x": torch.zeros(2)}, minimal_meta(written))
    assert fileformat.read_container(path, written).kind == written
    for expected in fileformat.FORMAT_NAMES:
        if expected == written:
            continue
        with pytest.raises(UserError) as err:
            fileformat.read(path, expected)
        message = str(err.value)
        assert str(path) in message
        assert KIND_PHRASE[written] in message and KIND_PHRASE[expected] in message, message
        assert message.index(KIND_PHRASE[written]) < message.index("not ")  # "is a <written>, not a <expected>"


def test_real_truth_file_read_as_dump_is_refused(dumps):
    with pytest.raises(UserError, match="truth file.*not a gradient dump"):
        fileformat.read(dumps["plain"] / TRUTH0, "gradients")


def test_missing_required_metadata_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    meta = minimal_meta("gradients")
    del meta["capture"]
    fileformat.write(path, "gradients", {"x": torch.zeros(1)}, meta)
    with pytest.raises(UserError, match="capture"):
        fileformat.read(path, "gradients")


def test_non_finite_tensor_is_refused(tmp_path):
    path = tmp_path / "nan.safetensors"
    fileformat.write(path, "truth", {"images": torch.tensor([0.0, float("nan")])}, minimal_meta("truth"))
    with pytest.raises(UserError, match="NaN"):
        fileformat.read_container(path, "truth")


def test_write_replaces_atomically(tmp_path, dumps):
    path = tmp_path / "out.safetensors"
    shutil.copy2(dumps["plain"] / TRUTH0, path)
    fileformat.write(path, "truth", {"images": torch.ones(1, 3, 2, 2)}, minimal_meta("truth"))
    assert torch.equal(fileformat.read_container(path, "truth").tensors["images"], torch.ones(1, 3, 2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"the previous, complete file")
    shared = torch.zeros(3)
    with pytest.raises(Exception):
        # safetensors refuses two names for one storage: the write fails part way.
        fileformat.write(path, "truth", {"a": shared, "b": shared}, minimal_meta("truth"))
    assert path.read_bytes() == b"the previous, complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
