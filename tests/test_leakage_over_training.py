"""examples/leakage_over_training.py: the pipeline through the CLI at its smallest, and its refusals.

One real run (a 16-wide MLP on 8x8 built-in images, 1 victim, 5 attack iterations, epochs 0 and 1)
checks that the table has one row per epoch with the run's own accuracies, that the option
mapping reached the run (`noise:1e-3` -> a noise scale of 0.001 in run.yaml), and that the figure
is a PNG. The refusals run in-process and start no command.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "leakage_over_training.py"
TINY = ["--width", "16", "--image-size", "8", "--subset", "64", "--victims", "1", "--iterations", "5"]


def _script():
    spec = importlib.util.spec_from_file_location("leakage_over_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smallest_run_writes_the_table_and_the_figure(tmp_path):
    out = tmp_path / "lot"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--defenses", "noise:1e-3", "--epochs", "1", *TINY]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "leakage_over_training.json").read_text())
    rows = document["rows"]
    assert [(r["defense"], r["epoch"]) for r in rows] == [("noise:1e-3", 0), ("noise:1e-3", 1)]
    history = json.loads((out / "runs" / "noise-1e-3" / "history.json").read_text())
    assert rows[0]["test_accuracy"] is None  # train measures after each epoch: the untrained model has none
    assert rows[1]["test_accuracy"] == history["epochs"][0]["test_accuracy"]
    for row in rows:
        assert row["data"] == "builtin" and row["model"] == "mlp" and row["n"] == 1
        assert -1 <= row["mean_ssim"] <= 1
        assert row["asr"] == float(row["mean_ssim"] >= 0.6)  # one victim: recovered or not
        assert row["label_accuracy"] == 1.0  # labels are shared
    assert document["runs"]["noise:1e-3"]["defense"] == [
        {"name": "noise", "params": {"scale": 0.001, "distribution": "gaussian"}}]
    assert document["seed"] == 0 and document["config"]["victims"] == 1 and document["tool"]["precode"]
    assert len(document["commands"]) == 6 and document["commands"][0]["command"].startswith("precode train ")
    with open(out / "leakage_over_training.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["epoch"], r["test_accuracy"]) for r in table] == [("0", ""), ("1", str(rows[1]["test_accuracy"]))]
    assert [float(r["mean_ssim"]) for r in table] == [r["mean_ssim"] for r in rows]
    png = (out / "leakage_over_training.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"lot"}  # nothing outside --out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr, again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # a second run touches nothing


@pytest.mark.parametrize("options, phrase", [
    (["--defenses", "noise:-1"], "must be a positive number"),
    (["--defenses", "precode:3"], "only noise takes a value"),
    (["--defenses", "none,none"], "each once"),
    (["--capture-epochs", "0,9"], "between 0 and --epochs (4)"),
    (["--capture-epochs", "a"], "whole numbers"),
    (["--victims", "0"], "--victims must be at least 1"),
    (["--data", "mnist", "--mnist", "no-such-file"], "neither a safetensors file"),
])
def test_bad_options_are_one_sentence_and_start_nothing(tmp_path, capsys, options, phrase):
    code = _script().main(["--out", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("Error: ") and phrase in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_defense_options_map_to_the_cli():
    script = _script()
    assert script.defense_options("noise:1e-2") == ["--defense", "noise", "--noise-scale", "1e-2"]
    assert script.defense_options("precode") == ["--defense", "precode"]
    assert script.epoch_list("", 2) == [0, 1, 2] and script.epoch_list("4,0,2,2", 4) == [0, 2, 4]
