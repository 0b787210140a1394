"""Bad input: one sentence on stderr, exit code 2, no traceback, and nothing on disk changed."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import DUMP0, TRUTH0, assert_one_line_error, invoke, invoke_ok, tree_digest
from precode_cli import fileformat


def test_missing_dump_file(dumps, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    out = tmp_path / "recon"
    before = tree_digest(tmp_path, dumps["plain"])
    result = invoke("attack", missing, "--iterations", 1, "--out", out)
    assert_one_line_error(result, str(missing), "does not exist")
    assert tree_digest(tmp_path, dumps["plain"]) == before
    assert not out.exists() or not any(out.iterdir())


def test_truncated_dump(dump_copy, tmp_path):
    data = dump_copy.read_bytes()
    dump_copy.write_bytes(data[: len(data) // 2])
    out = tmp_path / "recon"
    before = tree_digest(tmp_path)
    result = invoke("attack", dump_copy, "--iterations", 1, "--out", out)
    message = assert_one_line_error(result, str(dump_copy))
    assert "not a valid safetensors file" in message or "damaged" in message, message
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                         dtype=torch.uint8).tolist()), id="random-bytes"),
        pytest.param(("These are my notes, not a gradient dump.\n" * 20).encode(), id="text-file"),
        pytest.param(b"", id="empty-file"),
    ],
)
def test_not_a_safetensors_file(tmp_path, content):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(content)
    out = tmp_path / "recon"
    before = tree_digest(tmp_path)
    result = invoke("attack", bogus, "--iterations", 1, "--out", out)
    assert_one_line_error(result, str(bogus), "not a valid safetensors file", "gradient dump")
    assert tree_digest(tmp_path) == before


def test_safetensors_without_precode_metadata(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    result = invoke("attack", foreign, "--iterations", 1, "--out", tmp_path / "recon")
    assert_one_line_error(result, str(foreign), "not a precode file")


def test_newer_format_version(dump_copy, tmp_path):
    with safe_open(str(dump_copy), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = dict(f.metadata())
    newest = fileformat.VERSIONS["gradients"]
    metadata["format_version"] = str(newest + 1)
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata=metadata)
    out = tmp_path / "recon"
    before = tree_digest(tmp_path)
    result = invoke("attack", newer, "--iterations", 1, "--out", out)
    assert_one_line_error(result, str(newer), f"version {newest + 1}", f"the version {newest} this precode reads",
                          "upgrade")
    assert tree_digest(tmp_path) == before


def test_unknown_method(dumps, tmp_path):
    out = tmp_path / "recon"
    before = tree_digest(dumps["plain"])
    result = invoke("attack", dumps["plain"] / DUMP0, "--method", "dlgx", "--out", out)
    assert_one_line_error(result, "--method", "'dlgx'", "ig")
    assert tree_digest(dumps["plain"]) == before
    assert not out.exists()


def test_unknown_defense_train(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--defense", "shield", "--epochs", 0, "--out", out)
    assert_one_line_error(result, "--defense", "'shield'", "precode")
    assert not out.exists()


def test_unknown_defense_capture(tmp_path):
    out = tmp_path / "grads"
    result = invoke("capture-gradients", "--defense", "shield", "--indices", "0:1", "--out", out)
    assert_one_line_error(result, "--defense", "'shield'", "precode")
    assert not out.exists()


def test_capture_from_run_with_other_defense(tmp_path):
    """A run trained without a defense, captured with --defense precode: a clear refusal, not a crash.

    (Regression: the message was once built from options['model_defense'], a key the options do
    not have, so the command died with "Internal error: KeyError" and exit code 1.)
    """
    run = tmp_path / "run"
    invoke_ok("train", "--epochs", 0, "--out", run)
    out = tmp_path / "grads"
    before = tree_digest(tmp_path)
    result = invoke("capture-gradients", run, "--defense", "precode", "--indices", "0:1", "--out", out)
    assert_one_line_error(result, "--defense", "precode")
    assert tree_digest(tmp_path) == before


# --- an output directory that already holds results ------------------------------------------------


def _existing(out, names):
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).write_bytes(b"earlier results: " + name.encode())
    return tree_digest(out)


def test_train_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    before = _existing(out, ["model.safetensors", "run.yaml", "history.json"])
    result = invoke("train", "--epochs", 0, "--out", out)
    assert_one_line_error(result, str(out / "model.safetensors"), "already exist", "--force")
    assert tree_digest(out) == before


def test_capture_refuses_to_overwrite_then_force_succeeds(tmp_path):
    out = tmp_path / "grads"
    before = _existing(out, [DUMP0])
    result = invoke("capture-gradients", "--indices", "0:1", "--out", out)
    assert_one_line_error(result, str(out / DUMP0), "already exist", "--force")
    assert tree_digest(out) == before

    invoke_ok("capture-gradients", "--indices", "0:1", "--out", out, "--force")
    stored = fileformat.read(out / DUMP0, "gradients")  # the placeholder was replaced by a real dump
    assert stored.meta["capture"]["options"]["indices"] == "0:1"
    assert "grad.classifier.weight" in stored.tensors
    assert fileformat.read(out / TRUTH0, "truth").meta["dump"]["sha256"] == fileformat.sha256_of(out / DUMP0)
    assert sorted(p.name for p in out.iterdir()) == sorted([".precode.lock", DUMP0, TRUTH0, "states"])
    assert [p.name for p in (out / "states").iterdir()] == [f"{stored.meta['state']['sha256']}.safetensors"]


def test_capture_refuses_when_only_a_truth_file_exists(tmp_path):
    out = tmp_path / "grads"
    before = _existing(out, [TRUTH0])
    result = invoke("capture-gradients", "--indices", "0:1", "--out", out)
    assert_one_line_error(result, "already exist", "--force")
    assert tree_digest(out) == before


def test_attack_refuses_to_overwrite(dumps, tmp_path):
    out = tmp_path / "recon"
    before = _existing(out, [DUMP0])
    result = invoke("attack", dumps["plain"] / DUMP0, "--iterations", 1, "--out", out)
    assert_one_line_error(result, str(out / DUMP0), "already exist", "--force")
    assert tree_digest(out) == before


def test_evaluate_refuses_to_overwrite(recon_nolabels, dumps, tmp_path):
    out = tmp_path / "report"
    before = _existing(out, ["metrics.json"])
    result = invoke("evaluate", recon_nolabels["plain_nolabels"], "--truth", dumps["plain_nolabels"], "--out", out)
    assert_one_line_error(result, str(out / "metrics.json"), "already exist", "--force")
    assert tree_digest(out) == before


# --- files that must never be unpickled ------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: proof that pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_file(path, marker):
    path.write_bytes(pickle.dumps({"grad.w": _Payload(marker)}))


def _torch_save_file(path, marker):
    torch.save({"grad.w": torch.zeros(2), "payload": _Payload(marker)}, str(path))


def test_the_payload_is_live(tmp_path):
    """The payload used below really runs when unpickled, so its absence later means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("make", [_pickle_file, _torch_save_file], ids=["pickle", "torch-save"])
def test_pickle_dump_is_refused_without_running_it(tmp_path, make):
    marker = tmp_path / "MARKER-pickle-ran"
    evil = tmp_path / "dump.safetensors"
    make(evil, marker)
    assert not marker.exists()
    out = tmp_path / "recon"
    before = tree_digest(tmp_path)
    result = invoke("attack", evil, "--iterations", 1, "--out", out)
    assert_one_line_error(result, str(evil), "not a valid safetensors file")
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("make", [_pickle_file, _torch_save_file], ids=["pickle", "torch-save"])
def test_pickle_model_file_is_refused_without_running_it(tmp_path, make):
    marker = tmp_path / "MARKER-pickle-ran"
    run = tmp_path / "run"
    run.mkdir()
    make(run / "model.safetensors", marker)
    result = invoke("capture-gradients", run, "--indices", "0:1", "--out", tmp_path / "grads")
    assert_one_line_error(result, str(run / "model.safetensors"), "not a valid safetensors file", "model file")
    assert not marker.exists()
    assert not (tmp_path / "grads").exists()


def test_pickle_dump_in_a_real_process(tmp_path):
    """The same through `python -m precode_cli` in its own process: exit 2, one line, no traceback."""
    marker = tmp_path / "MARKER-pickle-ran"
    evil = tmp_path / "dump.safetensors"
    _torch_save_file(evil, marker)
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "precode_cli", "attack", str(evil), "--iterations", "1", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(evil) in lines[0], proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "r").exists()


# --- truth files are not dumps -----------------------------------------------------------------------


def test_truth_file_passed_to_attack(dumps, tmp_path):
    truth = dumps["plain"] / TRUTH0
    before = tree_digest(dumps["plain"])
    result = invoke("attack", truth, "--iterations", 1, "--out", tmp_path / "recon")
    assert_one_line_error(result, str(truth), "truth file")
    assert tree_digest(dumps["plain"]) == before
    assert not (tmp_path / "recon").exists()


def test_renamed_truth_file_passed_to_attack(dumps, tmp_path):
    """Renaming a truth file does not sneak it past the attack: its metadata says what it is."""
    renamed = tmp_path / "looks-like-a-dump.safetensors"
    shutil.copy2(dumps["plain"] / TRUTH0, renamed)
    result = invoke("attack", renamed, "--iterations", 1, "--out", tmp_path / "recon")
    assert_one_line_error(result, str(renamed), "truth file", "not a gradient dump")
    assert not (tmp_path / "recon").exists()


def test_debug_shows_the_exception_and_does_not_stick(tmp_path):
    from precode_cli.errors import UserError

    missing = tmp_path / "nowhere.safetensors"
    result = invoke("--debug", "attack", missing, "--iterations", 1, "--out", tmp_path / "r")
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError) and str(missing) in str(result.exception)
    # The next command without --debug is back to the one-line error.
    result = invoke("attack", missing, "--iterations", 1, "--out", tmp_path / "r")
    assert_one_line_error(result, str(missing))


def test_attack_out_into_the_dump_folder_is_refused_even_with_force(dumps, tmp_path):
    folder = tmp_path / "grads"
    folder.mkdir()
    shutil.copy(dumps["plain"] / DUMP0, folder / DUMP0)
    before = tree_digest(folder)
    result = invoke("attack", folder / DUMP0, "--iterations", 1, "--out", folder, "--force")
    assert_one_line_error(result, "--out", "where the dumps are")
    assert tree_digest(folder) == before


# --- defense lists and defense options ---------------------------------------------------------------

DEFENSE_REFUSALS = [
    pytest.param(["--defense", "precode,shield"], ["--defense", "'shield'", "choose one of"], id="unknown-in-list"),
    pytest.param(["--defense", "none", "--defense", "noise"], ["--defense none", "cannot be combined"],
                 id="none-and-noise"),
    pytest.param(["--defense", "noise", "--defense", "noise"], ["--defense noise", "twice"], id="twice"),
    pytest.param(["--defense", "prune,noise,prune"], ["--defense prune", "twice"], id="twice-comma"),
    pytest.param(["--defense", "precode", "--defense", "ppp"], ["ppp", "precode", "not both"], id="precode-and-ppp"),
    pytest.param(["--noise-scale", "0.1"], ["--noise-scale", "--defense noise", "not chosen"],
                 id="option-without-defense"),
    pytest.param(["--defense", "dp", "--dp-sigma", "0"], ["--dp-sigma", "above 0"], id="dp-sigma-zero"),
    pytest.param(["--defense", "prune", "--prune-keep", "1.5"], ["--prune-keep", "(0, 1]", "1.5"],
                 id="prune-keep-above-1"),
    pytest.param(["--defense", "noise", "--noise-distribution", "cauchy"],
                 ["--noise-distribution", "gaussian, laplace", "'cauchy'"], id="unknown-distribution"),
    pytest.param(["--defense", "dp", "--model", "resnet18"], ["dp", "BatchNorm", "--norm group"],
                 id="dp-with-batchnorm"),
    pytest.param(["--defense", "dp", "--defense", "soteria"], ["dp", "soteria", "separately"], id="dp-and-soteria"),
]


@pytest.mark.parametrize("command", ["train", "capture-gradients"])
@pytest.mark.parametrize("args, phrases", DEFENSE_REFUSALS)
def test_bad_defense_choice_is_refused_before_anything_is_written(
    tmp_path: Path, command: str, args: list[str], phrases: list[str],
) -> None:
    """Every command that builds a client refuses a bad defense list or parameter the same way."""
    out = tmp_path / "out"
    extra = ["--epochs", 0] if command == "train" else ["--indices", "0:1"]
    before = tree_digest(tmp_path)
    result = invoke(command, *args, *extra, "--out", out)
    assert_one_line_error(result, *phrases)
    assert tree_digest(tmp_path) == before
    assert not out.exists()


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained with --defense noise --noise-scale 0.01 (no epochs: only its recorded defense matters)."""
    run = tmp_path_factory.mktemp("noise") / "run"
    invoke_ok("train", "--defense", "noise", "--noise-scale", 0.01, "--width", 16, "--epochs", 0, "--out", run)
    return run


@pytest.mark.parametrize("args, phrases", [
    pytest.param(["--noise-scale", "0.2"], ["--noise-scale", "noise(scale=0.01", "drop --noise-scale"],
                 id="own-option"),
    pytest.param(["--dp-sigma", "1"], ["--dp-sigma", "keeps the defense it was trained with"], id="other-option"),
    pytest.param(["--defense", "prune"], ["trained with defense noise", "--defense prune", "drop --defense"],
                 id="other-defense"),
    pytest.param(["--defense", "precode,noise"], ["trained with defense noise", "--defense precode+noise"],
                 id="extra-defense"),
])
def test_capture_from_a_run_refuses_to_change_its_defense(
    noise_run: Path, tmp_path: Path, args: list[str], phrases: list[str],
) -> None:
    """A run's model was trained with its own defense: capture may not re-parametrise or swap it."""
    out = tmp_path / "grads"
    before = tree_digest(tmp_path, noise_run)
    result = invoke("capture-gradients", noise_run, *args, "--indices", "0:1", "--out", out)
    assert_one_line_error(result, *phrases)
    assert tree_digest(tmp_path, noise_run) == before
    assert not out.exists()
