"""The command line as a user meets it: help screens, choices, defaults, completion, --debug, renamed options."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import assert_one_line_error, invoke
from precode_cli import __version__
from precode_cli.app import app
from precode_cli.errors import UserError

COMMANDS = ["train", "capture-gradients", "attack", "evaluate"]


def help_at(width: int, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]], ids=["precode", *COMMANDS])
def test_help_at_80_columns_is_clean(command):
    text = help_at(80, *command)
    assert max(len(line) for line in text.splitlines()) <= 80
    for placeholder in ("<bool>", "<str>", "<list[", "<int range>", "<float range>", "{DUMP", "{RECON_DIR",
                        "[[RUN_DIR]]", "<path>", "9223372036854775807"):
        assert placeholder not in text, f"{placeholder!r} in `precode {' '.join(command)} --help`"
    assert "Example:" in text


def test_train_help_is_short_and_in_panels():
    text = help_at(80, "train")
    assert len(text.splitlines()) < 130  # 206 lines in one flat panel before the panels
    for panel in ("Data", "Model", "Defense", "Training", "Output and run"):
        assert f"─ {panel} ─" in text
    assert "─ Options ─" not in text  # no panel left holding only --help
    assert "Reads:" in text and "Writes:" in text


def test_usage_lines_name_the_arguments_plainly():
    assert "Usage: precode attack [OPTIONS] DUMP..." in help_at(100, "attack")
    assert "Usage: precode evaluate [OPTIONS] RECON_DIR..." in help_at(100, "evaluate")
    assert "Usage: precode capture-gradients [OPTIONS] [RUN_DIR]" in help_at(100, "capture-gradients")


def test_help_lists_the_choices_and_shows_every_default():
    attack, train = " ".join(help_at(200, "attack").split()), " ".join(help_at(200, "train").split())
    for method in ("ig", "ig-adaptive", "ig-noise", "dlg", "idlg", "analytic"):
        assert method in attack
    assert "[default: ig]" in attack and "<precode|geiping|fast>" in attack and "[default: precode]" in attack
    for dataset in ("builtin", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "tensors"):
        assert dataset in train
    assert "<auto|cpu|cuda|mps>" in train and "<adam|sgd>" in train and "<batch|group>" in train
    for default in ("[default: builtin]", "[default: mlp]", "[default: 64]", "[default: 0.001]",
                    "[default: the dataset's own]", "[default: mlp 1024, cnn 32, convnet 64]", "[default: 256]"):
        assert default in train, default
    capture = " ".join(help_at(200, "capture-gradients").split())
    assert "--no-share-labels" in capture and "[default: share-labels]" in capture
    assert "[default: the run's, else builtin]" in capture


@pytest.mark.parametrize("args,flag,values", [
    (["train", "--dataset", "cifar11"], "--dataset", "builtin, cifar10"),
    (["train", "--device", "tpu"], "--device", "auto, cpu, cuda, mps"),
    (["train", "--optimizer", "lbfgs"], "--optimizer", "adam, sgd"),
    (["train", "--norm", "layer"], "--norm", "batch, group"),
    (["train", "--stats", "imagenet"], "--stats", "cifar10, cifar100, mnist, fashion-mnist"),
    (["train", "--noise-distribution", "cauchy"], "--noise-distribution", "gaussian, laplace"),
    (["capture-gradients", "--split", "val"], "--split", "train, test, all"),
    (["capture-gradients", "--mode", "sideways"], "--mode", "train, eval"),
    (["capture-gradients", "--dataset", "IMAGEFOLDER"], "--dataset", "builtin, cifar10"),  # names are lower case
    (["attack", "d.safetensors", "--method", "gan"], "--method", "ig, ig-adaptive, ig-noise, dlg, idlg, analytic"),
    (["attack", "d.safetensors", "--preset", "quick"], "--preset", "precode, geiping, fast"),
    (["attack", "d.safetensors", "--init", "ones"], "--init", "randn, rand, zeros"),
    (["evaluate", "r", "--truth", "g", "--space", "lab"], "--space", "pixel, normalized"),
])
def test_a_value_outside_the_choices_is_one_line(tmp_path, args, flag, values):
    result = invoke(*args, "--out", tmp_path / "out")
    message = assert_one_line_error(result, f"unknown {flag} '", f"choose one of: {values}")
    assert "Value error" not in message
    assert not (tmp_path / "out").exists()


def test_a_bad_choice_in_a_config_file_is_the_same_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("device: tpu\n")
    assert_one_line_error(invoke("train", "--config", config, "--out", tmp_path / "run"), "unknown --device 'tpu'")


def test_stages_receive_choices_as_plain_strings(tmp_path, monkeypatch):
    import precode_cli.stages.train as stage

    seen = {}
    monkeypatch.setattr(stage, "run_train", seen.update)
    invoke("train", "--device", "cpu", "--norm", "group", "--stats", "mnist", "--out", tmp_path / "run")
    assert (seen["device"], seen["norm"], seen["stats"], seen["dataset"]) == ("cpu", "group", "mnist", "builtin")
    assert all(type(seen[k]) is str for k in ("device", "norm", "stats", "dataset", "optimizer"))


def test_version_short_and_long():
    for flag in ("-V", "--version"):
        result = invoke(flag)
        assert result.exit_code == 0 and result.stdout.strip() == f"precode {__version__}"


def test_debug_after_the_command_takes_effect(tmp_path):
    missing = tmp_path / "missing.safetensors"
    result = invoke("attack", missing, "--iterations", 1, "--out", tmp_path / "r", "--debug")
    assert isinstance(result.exception, UserError), result.output  # the traceback, not the one-line error
    result = invoke("attack", missing, "--debug", "--iterations", 1, "--out", tmp_path / "r")
    assert isinstance(result.exception, UserError)
    # ... and does not stick to the next command
    assert_one_line_error(invoke("attack", missing, "--iterations", 1, "--out", tmp_path / "r"), "does not exist")


def test_debug_is_not_taken_from_an_option_value_or_after_a_separator(tmp_path):
    result = invoke("evaluate", tmp_path / "recon", "--note", "--debug", "--truth", tmp_path / "g", "--out", tmp_path / "rep")
    assert_one_line_error(result)  # --debug was the note; the error is the usual one line
    result = invoke("attack", "--out", tmp_path / "r", "--", "--debug")
    assert_one_line_error(result, "--debug")  # a dump named --debug


def test_renamed_options_still_work_with_a_note(tmp_path, monkeypatch):
    import precode_cli.stages.attack as attack_stage
    import precode_cli.stages.train as train_stage

    seen = {}
    monkeypatch.setattr(train_stage, "run_train", seen.update)
    monkeypatch.setattr(attack_stage, "run_attack", seen.update)
    result = invoke("train", "--checkpoint-every", 3, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert seen["checkpoint_every"] == 3
    assert result.stderr.strip() == "Note: --checkpoint-every in train is deprecated; use --checkpoint-epochs."
    result = invoke("attack", "d.safetensors", "--model=pkg.mod:build", "--checkpoint-every", 7, "--model", "pkg.mod:build",
                    "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert (seen["model"], seen["checkpoint_every"]) == ("pkg.mod:build", 7)
    assert result.stderr.splitlines() == [
        "Note: --model in attack is deprecated; use --trust-builder.",
        "Note: --checkpoint-every in attack is deprecated; use --checkpoint-iterations.",
    ]
    result = invoke("attack", "d.safetensors", "--trust-builder", "pkg.mod:build", "--checkpoint-iterations", 9,
                    "--out", tmp_path / "r")
    assert result.exit_code == 0 and result.stderr == ""
    assert (seen["model"], seen["checkpoint_every"]) == ("pkg.mod:build", 9)
    # --model keeps its meaning (the architecture) in train and capture-gradients: no note there.
    result = invoke("train", "--model", "cnn", "--out", tmp_path / "run")
    assert result.stderr == "" and seen["model"] == "cnn"
    # An old name's bad value is reported under the new name, after the note.
    result = invoke("train", "--checkpoint-every", -1, "--out", tmp_path / "x")
    assert result.exit_code == 2
    note, error = result.stderr.splitlines()
    assert note.startswith("Note: --checkpoint-every") and error.startswith("Error: Invalid value for '--checkpoint-epochs'")


def test_config_keys_take_new_and_old_names(tmp_path, monkeypatch):
    import precode_cli.stages.attack as stage

    seen = {}
    monkeypatch.setattr(stage, "run_attack", seen.update)
    for text, expected in [("checkpoint-iterations: 5\ntrust-builder: a.b:c\n", (5, "a.b:c")),
                           ("checkpoint_every: 6\nmodel: a.b:d\n", (6, "a.b:d"))]:
        config = tmp_path / "attack.yaml"
        config.write_text(text)
        result = invoke("attack", "d.safetensors", "--config", config, "--out", tmp_path / "r")
        assert result.exit_code == 0, result.output
        assert (seen["checkpoint_every"], seen["model"]) == expected
    config.write_text("checkpoint-everything: 1\n")
    message = assert_one_line_error(invoke("attack", "d.safetensors", "--config", config, "--out", tmp_path / "r"))
    assert "checkpoint-iterations" in message and "trust-builder" in message  # known keys by their current names


# Typer finds the user's shell from the process tree (shellingham); under a test runner started by a job
# or a daemon there is no shell to find, so the tests name it, with Typer's switch for that.
NAMED_SHELL = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1", "SHELL": "/bin/bash"}


def test_show_completion_prints_a_script():
    # a fresh process: Typer reads the switch when it builds the app's options
    script = shutil.which("precode", path=str(Path(sys.executable).parent))
    assert script is not None, "installing precode (README's way) puts its console script next to python"
    proc = subprocess.run([script, "--show-completion", "bash"], capture_output=True, text=True,
                          env={**os.environ, **NAMED_SHELL}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "complete" in proc.stdout and "_PRECODE_COMPLETE" in proc.stdout


def test_install_completion_writes_the_script(tmp_path):
    script = shutil.which("precode", path=str(Path(sys.executable).parent))
    assert script is not None, "installing precode (README's way) puts its console script next to python"
    env = {**os.environ, "HOME": str(tmp_path), **NAMED_SHELL}
    proc = subprocess.run([script, "--install-completion", "bash"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "completion installed" in proc.stdout
    assert (tmp_path / ".bash_completions" / "precode.sh").is_file()
    assert "precode.sh" in (tmp_path / ".bashrc").read_text()


def test_completion_offers_options_and_choices():
    env = {"_PRECODE_COMPLETE": "complete_bash", "COMP_WORDS": "precode attack --method ", "COMP_CWORD": "3"}
    result = CliRunner().invoke(app, [], env=env, prog_name="precode")
    assert result.stdout.split() == ["ig", "ig-adaptive", "ig-noise", "dlg", "idlg", "analytic", "ig-bn", "imprint"]
