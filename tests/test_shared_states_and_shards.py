"""Format version 2 (model states stored once, Linear gradients as exact factors), version-1 dumps, and --shard.

Small models (an MLP of width 16 on 8x8 images) keep these fast; the real MLP's sizes are measured in
the issue's report, not here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import DUMP0, assert_one_line_error, invoke, invoke_ok
from precode_cli import factors, fileformat, states
from precode_cli.errors import UserError
from precode_cli.stages import attack as attack_stage
from precode_cli.stages import capture as capture_stage
from precode_cli.stages import client
from precode_cli.stages.profiles import for_files
from defenses import DefenseStack

SMALL = ["--model", "mlp", "--width", "16", "--image-size", "8"]


def on_disk(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def dumps_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.endswith(".truth.safetensors"))


@pytest.mark.parametrize("defense,batch", [("none", 1), ("precode", 1), ("none", 3), ("noise", 1), ("soteria", 2)])
def test_every_factored_gradient_reads_back_equal_to_the_clients(tmp_path, defense, batch):
    out = tmp_path / "g"
    invoke_ok("capture-gradients", *SMALL, "--defense", defense, "--indices", f"0:{2 * batch}", "--batch-size", batch,
              "--seed", 3, "--out", out)
    assert len(list((out / states.STATES_DIR).iterdir())) == 1  # one state for every dump
    factored = 0
    for dump in dumps_of(out):
        stored = fileformat.read(dump, "gradients", profile=for_files(None))
        raw = on_disk(dump)
        assert not any(name.startswith(("param.", "buffer.")) for name in raw)
        factored += sum(name.endswith(".left") for name in raw)
        # The client's gradient, computed again exactly as capture did for this batch.
        meta = stored.meta
        stack = DefenseStack.from_specs(meta["defense"])
        torch.manual_seed(0)
        model = stack.build_model(meta["model"])
        model.load_state_dict({**stored.prefixed("param"), **stored.prefixed("buffer")})
        model.train()
        truth = fileformat.read(dump.with_name(dump.name.replace(".safetensors", ".truth.safetensors")), "truth")
        first = truth.meta["indices"][0]
        from precode_cli import data

        inputs = data.normalize(truth.tensors["images"], meta["data"])
        torch.manual_seed(capture_stage.batch_seed(3, first))
        generator = torch.Generator().manual_seed(capture_stage.batch_seed(3, first))
        grads = client.shared_gradient(model, stack, inputs, truth.tensors["labels"], generator)
        assert set(stored.prefixed("grad")) == set(grads)
        for name, grad in grads.items():
            assert torch.equal(stored.tensors[f"grad.{name}"], grad), (defense, batch, name)
    if defense in ("noise", "soteria"):
        # a gradient-space defense: the shared matrix is no sum of outer products; Soteria's batched
        # backward through the layers before its representation marks them as not recorded once
        assert factored == 0
    else:
        assert factored > 0


def test_factors_are_kept_only_when_exact():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    recorder = factors.LinearRecorder()
    with recorder.watching(layer):
        loss = layer(torch.randn(1, 6)).square().sum()
    grads = dict(zip(["weight", "bias"], torch.autograd.grad(loss, [layer.weight, layer.bias])))
    stored = recorder.factor(grads)
    assert set(stored) == {"bias", "factor.weight.left", "factor.weight.right"}
    assert torch.equal(factors.rebuild_all({f"grad.{k}" if not k.startswith("factor") else k: v
                                            for k, v in stored.items()})["grad.weight"], grads["weight"])
    noisy = {**grads, "weight": grads["weight"] + 1e-3}
    assert "weight" in recorder.factor(noisy)  # not what the factors rebuild: stored whole


def test_state_is_verified_and_never_read_through_a_link(tmp_path):
    out = tmp_path / "g"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", out)
    dump = dumps_of(out)[0]
    state = next((out / states.STATES_DIR).iterdir())
    # A changed state: its tensors no longer hash to its name.
    tensors, meta = on_disk(state), fileformat.read_raw_metadata(state, "state")
    name = next(n for n in tensors if n.startswith("param."))
    tensors[name] = tensors[name] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(state), metadata=meta)
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          str(state), "does not hold the model state its name promises")
    # The states folder swapped for a link to a copy elsewhere: refused, never followed.
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(out / states.STATES_DIR), elsewhere)
    (out / states.STATES_DIR).symlink_to(elsewhere)
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          "is a symbolic link")
    # Missing: one sentence that says what to copy.
    (out / states.STATES_DIR).unlink()
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          "does not exist", "states/ folder")


def test_a_hash_is_a_name_not_a_path(tmp_path):
    out = tmp_path / "g"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", out)
    dump = dumps_of(out)[0]
    tensors, meta = on_disk(dump), fileformat.read_raw_metadata(dump, "gradients")
    meta["state"] = json.dumps({"sha256": "../../etc/passwd"})
    from safetensors.torch import save_file

    save_file(tensors, str(dump), metadata=meta)
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          "does not fit the precode-gradients schema", "state.sha256")


def test_factor_tensors_are_checked_by_declared_shape_before_loading(tmp_path):
    out = tmp_path / "g"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", out)
    dump = dumps_of(out)[0]
    tensors, meta = on_disk(dump), fileformat.read_raw_metadata(dump, "gradients")
    left = next(n for n in tensors if n.endswith(".left"))
    tensors[left] = torch.zeros(7, tensors[left].shape[1])
    from safetensors.torch import save_file

    save_file(tensors, str(dump), metadata=meta)
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          repr(left), "its metadata says [1, ")
    del tensors[left]
    save_file(tensors, str(dump), metadata=meta)
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          "holds only one of the factors")


def test_a_version_1_dump_still_attacks(tmp_path):
    """A real version-1 dump, written in the old layout (everything in the dump), read and attacked."""
    new, old = tmp_path / "g2", tmp_path / "g1"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:2", "--out", new)
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:2", "--format-version", "1", "--out", old)
    assert not (old / states.STATES_DIR).exists()
    for dump in dumps_of(old):
        assert fileformat.read_raw_metadata(dump, "gradients")["format_version"] == "1"
        assert any(n.startswith("param.") for n in on_disk(dump)) and not any(n.startswith("factor.")
                                                                            for n in on_disk(dump))
    a, b = tmp_path / "r1", tmp_path / "r2"
    invoke_ok("attack", old, "--iterations", 3, "--out", a)
    invoke_ok("attack", new, "--iterations", 3, "--out", b)
    for dump in dumps_of(old):
        one = fileformat.read(a / dump.name, "reconstruction").tensors["images"]
        two = fileformat.read(b / dump.name, "reconstruction").tensors["images"]
        assert torch.equal(one, two)  # the same victims, the same gradients, whichever layout
    invoke_ok("evaluate", a, "--truth", old, "--out", tmp_path / "report")


def test_sharded_run_with_an_interrupted_shard_equals_the_unsharded_one(tmp_path, monkeypatch):
    from test_attack_suite import fake_stop

    capture = ["capture-gradients", *SMALL, "--defense", "precode", "--indices", "0:6", "--seed", 1]
    attack = ["attack", "--iterations", 30, "--checkpoint-iterations", 10, "--vectorize", 2, "--seed", 0]
    invoke_ok(*capture, "--out", tmp_path / "g")
    invoke_ok(*attack[:1], tmp_path / "g", *attack[1:], "--out", tmp_path / "r")
    shards = tmp_path / "gs"
    for k in range(3):
        invoke_ok(*capture, "--shard", f"{k}/3", "--out", shards)
    assert len(dumps_of(shards)) == 6 and len(list((shards / states.STATES_DIR).iterdir())) == 1
    out = tmp_path / "rs"
    invoke_ok(*attack[:1], shards, *attack[1:], "--shard", "0/3", "--out", out)
    monkeypatch.setattr(attack_stage, "GracefulStop", fake_stop(1 + 12))  # SIGTERM at step 12 of shard 1
    result = invoke(*attack[:1], shards, *attack[1:], "--shard", "1/3", "--out", out)
    monkeypatch.undo()
    assert result.exit_code == 130, result.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["train-000002.safetensors"]
    invoke_ok(*attack[:1], shards, *attack[1:], "--shard", "2/3", "--out", out)  # the others go on meanwhile
    invoke_ok(*attack[:1], shards, *attack[1:], "--shard", "1/3", "--resume", "--out", out)
    for dump in dumps_of(tmp_path / "g"):
        one = fileformat.read(tmp_path / "r" / dump.name, "reconstruction")
        two = fileformat.read(out / dump.name, "reconstruction")
        assert two.meta["attack"]["completed"]
        for name in ("images", "labels", "loss_trace"):
            assert torch.equal(one.tensors[name], two.tensors[name]), (dump.name, name)
    result = invoke_ok("evaluate", out, "--truth", shards, "--out", tmp_path / "report")
    document = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert len(document["groups"]) == 1 and document["groups"][0]["summary"]["n"] == 6


def test_capture_resume_keeps_finished_dumps(tmp_path, monkeypatch):
    out = tmp_path / "g"
    args = ["capture-gradients", *SMALL, "--indices", "0:4", "--shard", "1/2", "--out", out]
    invoke_ok(*args)
    before = {p.name: p.stat().st_mtime_ns for p in dumps_of(out)}
    assert sorted(before) == ["train-000002.safetensors", "train-000003.safetensors"]
    assert_one_line_error(invoke(*args), "already exist", "--force")
    (out / "train-000003.truth.safetensors").unlink()  # stopped between the dump and its truth file
    invoke_ok(*args, "--resume")
    after = {p.name: p.stat().st_mtime_ns for p in dumps_of(out)}
    assert after["train-000002.safetensors"] == before["train-000002.safetensors"]
    assert (out / "train-000003.truth.safetensors").exists()


def test_capture_resume_restores_the_state_and_refuses_another_model(tmp_path):
    """--resume with every dump done still rewrites a lost state (the dumps would be unreadable without it),
    and refuses to continue dumps captured from another model state (here: another --seed's weights)."""
    out = tmp_path / "g"
    args = ["capture-gradients", *SMALL, "--indices", "0:2", "--out", out]
    invoke_ok(*args)
    shutil.rmtree(out / states.STATES_DIR)
    invoke_ok(*args, "--resume")
    for dump in dumps_of(out):
        fileformat.read(dump, "gradients", profile=for_files(None))
    before = {p.name: p.read_bytes() for p in out.rglob("*.safetensors")}
    assert_one_line_error(invoke(*args, "--seed", 1, "--resume"), "another model state", "--force")
    assert {p.name: p.read_bytes() for p in out.rglob("*.safetensors")} == before  # no second state either


def test_shard_locks(tmp_path):
    from precode_cli.outdir import OutputDir
    from precode_cli.shards import Shard

    out = tmp_path / "o"
    with OutputDir(out) as one, OutputDir(out) as two, OutputDir(out) as whole, OutputDir(out) as again:
        one.lock(Shard(0, 2))
        two.lock(Shard(1, 2))  # another shard of the array: runs alongside
        with pytest.raises(Exception, match="another precode command is writing"):
            again.lock()
        with pytest.raises(Exception, match="shard 1/2"):
            OutputDir(out).lock(Shard(1, 2))
        one.unlock(), two.unlock()
        whole.lock()
        with pytest.raises(Exception, match="without --shard is writing"):
            again.lock(Shard(0, 2))


@pytest.mark.parametrize("text,phrase", [("4/4", "out of range"), ("1", "K/N"), ("-1/3", "K/N"), ("0/0", "out of range")])
def test_bad_shard_is_one_sentence(tmp_path, text, phrase):
    assert_one_line_error(invoke("capture-gradients", *SMALL, "--indices", "0:1", "--shard", text,
                                 "--out", tmp_path / "g"), "--shard", phrase)


def test_shard_slices_are_deterministic_and_cover_everything():
    from precode_cli.shards import Shard

    units = list(range(10))
    slices = [Shard(k, 3).take(units) for k in range(3)]
    assert sum(slices, []) == units and [len(s) for s in slices] == [3, 3, 4]
    assert Shard(4, 5).take([1, 2]) == [2] and Shard(0, 5).take([1, 2]) == []


# --- a hostile folder: what a dump or a state may claim ------------------------------------------------


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)


def test_a_state_of_another_model_is_refused_before_loading(tmp_path, monkeypatch):
    """A dump that names the (valid, intact) state of a different model: its shapes are checked against the
    dump's own model from the header alone, so the state is neither loaded nor built into the wrong model."""
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", wide)
    invoke_ok("capture-gradients", "--model", "mlp", "--width", "8", "--image-size", "8", "--indices", "0:1",
              "--out", narrow)
    wide_state = next((wide / states.STATES_DIR).iterdir())
    shutil.copy2(wide_state, narrow / states.STATES_DIR / wide_state.name)
    dump = dumps_of(narrow)[0]
    tensors, meta = on_disk(dump), fileformat.read_raw_metadata(dump, "gradients")
    meta["state"] = json.dumps({"sha256": wide_state.stem})
    _rewrite(dump, tensors, meta)
    loaded = []
    original = fileformat._load_tensors
    monkeypatch.setattr(fileformat, "_load_tensors", lambda p, k: loaded.append(k) or original(p, k))
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          wide_state.name, "its metadata says")
    assert "state" not in loaded


def test_a_state_named_only_in_another_folder_is_not_found(tmp_path):
    """A hash is looked up beside the dump alone: a state that exists only in another GRADS_DIR is not used."""
    first, second = tmp_path / "first", tmp_path / "second"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", first)
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--seed", 1, "--out", second)
    other = next((first / states.STATES_DIR).iterdir())
    dump = dumps_of(second)[0]
    tensors, meta = on_disk(dump), fileformat.read_raw_metadata(dump, "gradients")
    assert json.loads(meta["state"])["sha256"] != other.stem  # another seed, other weights, another state
    meta["state"] = json.dumps({"sha256": other.stem})
    _rewrite(dump, tensors, meta)
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          str(second / states.STATES_DIR / other.name), "does not exist")


@pytest.mark.parametrize("what", ["fifo", "folder"])
def test_a_state_entry_that_is_not_a_file_is_refused_without_opening_it(tmp_path, what):
    import os

    out = tmp_path / "g"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", out)
    state = next((out / states.STATES_DIR).iterdir())
    state.unlink()
    os.mkfifo(state) if what == "fifo" else state.mkdir()  # a FIFO would block a reader that opened it
    assert_one_line_error(invoke("attack", dumps_of(out)[0], "--iterations", 1, "--out", tmp_path / "r"),
                          str(state), "is not a file")
    if what == "folder":  # a capture that must write the state there says so in one sentence, never crashes
        assert_one_line_error(invoke("capture-gradients", *SMALL, "--indices", "0:1", "--out", out, "--force"),
                              str(state), "Is a directory")


def test_a_state_whose_header_lies_is_refused(tmp_path):
    """A state whose header promises more data than the file holds, or an extra tensor, is refused unread."""
    out = tmp_path / "g"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", out)
    dump, state = dumps_of(out)[0], next((out / states.STATES_DIR).iterdir())
    pristine, state_meta = state.read_bytes(), fileformat.read_raw_metadata(state, "state")
    size = int.from_bytes(pristine[:8], "little")
    header = json.loads(pristine[8:8 + size])
    name = next(n for n in header if n.startswith("param."))
    header[name]["shape"] = [header[name]["shape"][0] * 1000, *header[name]["shape"][1:]]
    text = json.dumps(header).encode()
    state.write_bytes(len(text).to_bytes(8, "little") + text + pristine[8 + size:])
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"), str(state))
    tensors = on_disk_bytes(pristine)
    tensors["param.extra"] = torch.zeros(4)
    _rewrite(state, tensors, state_meta)
    assert_one_line_error(invoke("attack", dump, "--iterations", 1, "--out", tmp_path / "r"),
                          str(state), "'param.extra'")


def on_disk_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_rebuilt_factors_count_in_the_budget_before_loading(tmp_path, monkeypatch):
    """The matrices factors become are counted (with the dump's and the state's tensors) before any is loaded,
    so a dump cannot declare a small file's worth of factors and a huge matrix to rebuild."""
    from precode_cli import budget

    out = tmp_path / "g"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", out)
    dump = dumps_of(out)[0]
    table = fileformat.tensor_table(dump, "gradients")
    state_table = fileformat.tensor_table(next((out / states.STATES_DIR).iterdir()), "state")
    need = fileformat._table_bytes(table) + fileformat._rebuilt_bytes(table) + fileformat._table_bytes(state_table)
    assert fileformat._rebuilt_bytes(table) > fileformat._table_bytes(table)  # the case worth guarding
    loaded = []
    original = fileformat._load_tensors
    monkeypatch.setattr(fileformat, "_load_tensors", lambda p, k: loaded.append(k) or original(p, k))
    try:
        budget.set_max_memory((need - 1) / budget.GIB)
        with pytest.raises(UserError, match="would need about"):
            fileformat.read(dump, "gradients", profile=for_files(None))
        assert loaded == []
        budget.set_max_memory(need / budget.GIB)
        fileformat.read(dump, "gradients", profile=for_files(None))
    finally:
        budget.set_max_memory(None)


def test_a_factor_tensor_of_another_name_is_refused(tmp_path):
    """Only factor.<parameter>.left and .right exist; anything else under factor. is refused, never dropped."""
    out = tmp_path / "g"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:1", "--out", out)
    dump = dumps_of(out)[0]
    tensors, meta = on_disk(dump), fileformat.read_raw_metadata(dump, "gradients")
    left = next(n for n in tensors if n.endswith(".left"))
    tensors[left[: -len("left")] + "middle"] = torch.zeros(3)
    _rewrite(dump, tensors, meta)
    for profile in (None, for_files(None)):  # with or without the model's shapes
        with pytest.raises(UserError, match="middle"):
            fileformat.read(dump, "gradients", profile=profile)


def test_concurrent_shards_write_one_state(tmp_path):
    """Two shards started together into one folder both store the shared state (atomically, under one name):
    one state file, every dump reads back against it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "g"
    args = ["capture-gradients", *SMALL, "--indices", "0:4", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "precode_cli", *args, "--shard", f"{k}/2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    assert len(list((out / states.STATES_DIR).iterdir())) == 1
    assert len(dumps_of(out)) == 4
    for dump in dumps_of(out):
        fileformat.read(dump, "gradients", profile=for_files(None))


def test_dumps_of_other_weights_are_attacked_in_chunks_of_their_own(tmp_path):
    """Victims of another model state (another epoch or round) never share a vectorised chunk: each weight
    group is then matched as fast per victim as alone (docs/performance.md)."""
    first, second = tmp_path / "a", tmp_path / "b"
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:2", "--seed", 1, "--out", first)
    invoke_ok("capture-gradients", *SMALL, "--indices", "0:2", "--seed", 2, "--out", second)
    metas = {path: fileformat.read_meta(path, "gradients") for path in dumps_of(first) + dumps_of(second)}
    groups = {path: attack_stage._group_of(meta) for path, meta in metas.items()}
    assert len(set(groups.values())) == 2
    assert {groups[p] for p in dumps_of(first)} != {groups[p] for p in dumps_of(second)}
    chunks = attack_stage._chunks(list(groups), groups.__getitem__, 4)
    assert sorted(len(chunk) for chunk in chunks) == [2, 2]
    assert all(len({metas[p]["state"]["sha256"] for p in chunk}) == 1 for chunk in chunks)


def test_version_1_dumps_of_other_weights_are_attacked_in_chunks_of_their_own(tmp_path, monkeypatch):
    """A version-1 dump carries its own weights; once read, their digest keeps other models' dumps apart."""
    folder = tmp_path / "g"
    for seed in (1, 2):
        invoke_ok("capture-gradients", *SMALL, "--indices", "0:2", "--seed", seed, "--format-version", 1,
                  "--out", tmp_path / f"s{seed}")
        for dump in dumps_of(tmp_path / f"s{seed}"):
            folder.mkdir(exist_ok=True)
            shutil.copy(dump, folder / f"s{seed}-{dump.name}")
    digests = {}
    for dump in dumps_of(folder):
        stored = fileformat.read(dump, "gradients", profile=for_files(None))
        digests[dump.name] = attack_stage._weights_digest(stored.tensors)
        assert attack_stage._group_of(stored.meta) == attack_stage._group_of(
            fileformat.read_meta(dump, "gradients"))  # the header alone: the shard plan's group
    assert len(set(digests.values())) == 2 and digests["s1-" + dumps_of(tmp_path / "s1")[0].name] == digests[
        "s1-" + dumps_of(tmp_path / "s1")[1].name]
    chunks = []
    real = attack_stage._attack_chunk

    def recording(attack, chunk, *args):
        chunks.append(sorted(d.path.name for d in chunk))
        return real(attack, chunk, *args)

    monkeypatch.setattr(attack_stage, "_attack_chunk", recording)
    invoke_ok("attack", folder, "--iterations", 3, "--vectorize", 4, "--out", tmp_path / "r")
    assert len(list((tmp_path / "r").glob("*.safetensors"))) == 4
    assert sorted(len({digests[name] for name in chunk}) for chunk in chunks) == [1, 1]  # one model per chunk
