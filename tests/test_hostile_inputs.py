"""Inputs that others control, beyond precode's own files: image folders, --config files, the user's
model code, and text that reaches the terminal.

- Image folders: the walk never loops on symlinked directories and never opens anything but a
  regular file (a FIFO would block forever, /dev/zero would never end); it is bounded.
- --config: an anchor bomb, a huge file and deep nesting are refused quickly; each value must have
  its option's shape and type; text options get the text as written (`indices: 10:12`).
- --model package.module:builder: the builder's own failures are reported as the builder's.
- Paths and names print as themselves: `[red]x[/]` is never read as rich markup.

See docs/security.md for the promises these tests check.
"""

from __future__ import annotations

import builtins
import io
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import DUMP0, assert_one_line_error, invoke, invoke_ok
from precode_cli import cli_support, data
from precode_cli.datasets import imagefolder
from precode_cli.errors import UserError

TINY = ("--model", "mlp", "--width", 16, "--image-size", 8)


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts even a blocking open() of a FIFO."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- image folders ---------------------------------------------------------------------------------------


def _image_folder(root: Path) -> Path:
    for i, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), (40 * i + 10 * j, 100, 200)).save(root / cls / f"{j}.png")
    return root


@pytest.fixture
def opened(monkeypatch):
    """Every path that os.open or open() is asked for while the test runs."""
    seen: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, *args, **kwargs):
        seen.append(os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else repr(path))
        return real_os_open(path, *args, **kwargs)

    def open_(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    return seen


def test_a_fifo_named_like_an_image_is_refused_without_opening_it(tmp_path, opened):
    folder = _image_folder(tmp_path / "pics")
    fifo = folder / "b" / "1a.png"  # sorted between b/0.png and b/1.png
    os.mkfifo(fifo)
    with deadline(10):
        result = invoke("train", *TINY, "--dataset", "imagefolder", "--data-dir", folder, "--epochs", 0,
                        "--out", tmp_path / "run")
    assert_one_line_error(result, str(fifo), "is a FIFO", "regular files")
    assert str(fifo) not in opened
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_symlink_to_dev_zero_named_like_an_image_is_never_opened(tmp_path, opened):
    folder = _image_folder(tmp_path / "pics")
    zero = folder / "a" / "x.png"
    zero.symlink_to("/dev/zero")
    with deadline(10), pytest.raises(UserError, match="is a character device") as err:
        data.load("imagefolder", "all", folder)
    assert str(zero) in str(err.value)
    assert str(zero) not in opened and "/dev/zero" not in opened


def test_a_symlink_loop_in_a_class_folder_ends_and_counts_each_image_once(tmp_path):
    folder = _image_folder(tmp_path / "pics")
    (folder / "a" / "loop").symlink_to(folder / "a", target_is_directory=True)  # a/loop -> a
    (folder / "b" / "up").symlink_to(folder, target_is_directory=True)  # b/up -> the whole folder
    with deadline(10):
        s = data.load("imagefolder", "all", folder)
    assert s.class_names == ["a", "b"]
    assert s.labels.tolist() == [0, 0, 1, 1]  # torchvision's ImageFolder would list a/*.png 40 times


def test_a_symlinked_class_folder_and_image_count_as_before(tmp_path):
    """A class folder that is a symlink, and a symlink to a regular image, are followed (once)."""
    folder = _image_folder(tmp_path / "pics")
    elsewhere = _image_folder(tmp_path / "elsewhere")
    (folder / "c").symlink_to(elsewhere / "a", target_is_directory=True)
    (folder / "a" / "2.png").symlink_to(elsewhere / "b" / "0.png")
    s = data.load("imagefolder", "all", folder)
    assert s.class_names == ["a", "b", "c"]
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert torch.equal(s.images[2], s.images[3])  # a/2.png -> elsewhere/b/0.png, which looks like b/0.png
    assert torch.equal(s.images[5], s.images[0])  # c -> elsewhere/a


@pytest.mark.parametrize("limit,value,phrase", [
    ("MAX_IMAGES", 3, "over 3 images"),
    ("MAX_CLASSES", 1, "at most 1"),
    ("MAX_ENTRIES", 4, "over 4 entries"),
    ("MAX_IMAGE_BYTES", 50, "at most 50 bytes"),
])
def test_image_folder_bounds(tmp_path, monkeypatch, opened, limit, value, phrase):
    folder = _image_folder(tmp_path / "pics")
    opened.clear()  # making the images opened them
    monkeypatch.setattr(imagefolder, limit, value)
    with pytest.raises(UserError, match=phrase):
        data.load("imagefolder", "all", folder)
    assert not any(path.endswith(".png") for path in opened)  # refused before any image is opened


# --- --config files --------------------------------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_a_yaml_anchor_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nine aliases each: a billion strings if expanded. Refused at the first alias.

    Run in a child process under a 1 GiB address-space limit, so that a loader that does expand it
    fails the test instead of the machine.
    """
    lines = ["dumps:", '  - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"  - &{name} [{', '.join(['*' + previous] * 9)}]")  # a known key: no unknown-key escape
    config = _config(tmp_path, "\n".join(lines) + "\n")
    script = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from typer.testing import CliRunner
        from precode_cli.app import app
        result = CliRunner().invoke(app, ["attack", "--config", sys.argv[1], "--out", sys.argv[2]])
        print(result.exit_code)
        print(result.stderr.strip())
    """)
    done = subprocess.run([sys.executable, "-c", script, str(config), str(tmp_path / "r")], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parent)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr
    code, message = int(lines[0]), lines[1]
    assert code == 2, message
    assert "uses the YAML alias *a on line 3" in message and message.startswith("Error: ")
    assert not (tmp_path / "r").exists()


def test_a_huge_config_file_is_refused_before_it_is_parsed(tmp_path):
    config = _config(tmp_path, "# padding\n" * 1_000_000)  # 10 MB
    result = invoke("capture-gradients", *TINY, "--config", config, "--out", tmp_path / "g")
    assert result.exit_code == 2 and "is over 64 KiB" in result.stderr, result.output
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("text,phrases", [
    pytest.param("seed: {a: 1}\n", ["'seed' takes one value, not a mapping"], id="mapping-for-an-int"),
    pytest.param("seed: [1, 2]\n", ["'seed' takes one value, not a list"], id="list-for-an-int"),
    pytest.param("seed: true\n", ["'seed' takes a whole number, not 'true'"], id="bool-for-an-int"),
    pytest.param("width: 1.5\n", ["'width' takes a whole number, not '1.5'"], id="fraction-for-an-int"),
    pytest.param("force: 3\n", ["'force' takes true or false, not '3'"], id="number-for-a-flag"),
    pytest.param("defense: [[precode]]\n", ["items of 'defense' must be single values"], id="nested-list"),
    pytest.param("defense: " + "[" * 5000 + "]" * 5000 + "\n", ["more than 4 levels deep"], id="deep-nesting"),
    pytest.param("model: " + "m" * 5000 + "\n", ["5,000 characters"], id="long-text"),
    pytest.param("seed: 1\nseed: 2\n", ["sets 'seed' twice"], id="duplicate-key"),
    pytest.param("out: !!binary aGk=\n", ["tag !!binary", "not accepted"], id="odd-tag"),
    pytest.param("seed: [unclosed\n", ["not valid YAML (line 2, column 1: "], id="one-line-yaml-error"),
])
def test_config_values_must_fit_their_option(tmp_path, text, phrases):
    config = _config(tmp_path, text)
    result = invoke("capture-gradients", "--config", config, "--indices", "0:1", "--out", tmp_path / "g")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--config" in lines[0], result.stderr
    assert "Traceback" not in result.output and len(lines[0]) < 600
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not (tmp_path / "g").exists()


def test_text_options_take_the_text_as_written(tmp_path):
    """YAML 1.1 reads `10:12` as the base-60 number 612; --indices gets "10:12"."""
    config = _config(tmp_path, "indices: 10:12\nsplit: test\n")
    invoke_ok("capture-gradients", *TINY, "--config", config, "--out", tmp_path / "g")
    dumps = sorted(p.name for p in (tmp_path / "g").glob("*.safetensors") if ".truth." not in p.name)
    assert dumps == ["test-000010.safetensors", "test-000011.safetensors"]


def test_number_options_still_take_yaml_numbers_and_strings(tmp_path):
    """`1e-3` is a string to YAML 1.1; the option converts it as on the command line."""
    config = _config(tmp_path, "precode-beta: 1e-3\nprecode-k: 8\ndefense: precode\nforce: yes\nseed: ~\n")
    invoke_ok("capture-gradients", *TINY, "--config", config, "--indices", "0:1", "--out", tmp_path / "g")
    from precode_cli import fileformat

    meta = fileformat.read(tmp_path / "g" / DUMP0, "gradients").meta
    assert meta["defense"][0]["name"] == "precode"
    assert meta["defense"][0]["params"]["beta"] == pytest.approx(1e-3)


# --- the user's own model code ---------------------------------------------------------------------------

BUILDERS = '''
from torch import nn


def raises(input_shape, num_classes):
    raise ValueError("width must be even\\nsecond line")


def returns_none(input_shape, num_classes):
    return None


class _NoSignature:
    __signature__ = "not a signature"

    def __call__(self, **kwargs):
        return nn.Linear(1, 1)


no_signature = _NoSignature()
'''


@pytest.fixture
def builders(tmp_path, monkeypatch):
    name = f"hostile_builders_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(BUILDERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("attribute,phrases", [
    ("raises", ["raised ValueError: width must be even second line; fix your builder."]),
    ("returns_none", ["returned NoneType, not a torch nn.Module; fix your builder."]),
    ("no_signature", ["cannot read the signature of 'no_signature' (TypeError: "]),
])
def test_a_failing_builder_is_reported_as_the_builders_error(builders, tmp_path, attribute, phrases):
    result = invoke("capture-gradients", "--model", f"{builders}:{attribute}", "--indices", "0:1",
                    "--out", tmp_path / "g")
    assert_one_line_error(result, f"--model {builders}:{attribute}", *phrases)
    assert not (tmp_path / "g").exists()


# --- text, not markup ------------------------------------------------------------------------------------

MARKUP = "[red]x[/]"


def test_paths_with_markup_print_as_themselves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative paths: the table does not fold them
    grads, recon, report = Path(f"g/{MARKUP}"), Path("r/:smile: [bold]r[/]"), Path("e/[/]")
    result = invoke_ok("capture-gradients", *TINY, "--indices", "0:1", "--out", grads)
    assert f"Wrote 1 dump(s) and their truth files to {grads}." in result.stderr

    again = invoke("capture-gradients", *TINY, "--indices", "0:1", "--out", grads)
    assert_one_line_error(again, str(grads / DUMP0))
    into_dumps = invoke("attack", grads, "--iterations", 1, "--out", grads)
    assert_one_line_error(into_dumps, f"--out {grads} ")

    invoke_ok("attack", grads, "--iterations", 1, "--out", recon)
    result = invoke_ok("evaluate", recon, "--truth", grads, "--out", report)
    assert f"│ {recon} " in result.stdout  # the table's cell
    assert f"Wrote {report / 'metrics.json'}" in result.stderr


def test_say_tables_and_progress_print_plain_text(capsys, monkeypatch):
    from rich.console import Console
    from rich.table import Table

    cli_support.say(f"Wrote {MARKUP} and :smile:.")
    assert capsys.readouterr().err == f"Wrote {MARKUP} and :smile:.\n"

    from precode_cli.stages import attack, train

    attack._print_summary([(f"{MARKUP}.safetensors", 1.0, "dump", 0.5)])
    assert f"{MARKUP}.safetensors" in capsys.readouterr().out
    train._print_history([{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.0,
                           "test_accuracy": 0.5, "seconds": 1.0}])
    assert "training history" in capsys.readouterr().out
    table = Table("cell")
    cli_support.plain_row(table, "[bold]b[/bold] [/]")
    cli_support.stdout.print(table)
    assert "[bold]b[/bold] [/]" in capsys.readouterr().out

    screen = io.StringIO()
    monkeypatch.setattr(cli_support, "console", Console(file=screen, force_terminal=True, width=100))
    with cli_support.ProgressBar() as bar:
        bar.task(f"dump {MARKUP}", total=2).advance()
    assert f"dump {MARKUP}" in screen.getvalue()


def test_error_messages_print_as_plain_text(capsys):
    @cli_support.cli_command
    def fails() -> None:
        raise UserError(f"{MARKUP} and [/] stay as written.")

    import typer

    with pytest.raises(typer.Exit):
        fails()
    assert capsys.readouterr().err == f"Error: {MARKUP} and [/] stay as written.\n"


def test_a_gzip_bomb_idx_file_is_refused_within_the_memory_limit(tmp_path):
    """A small .gz that expands to 200 MB stops at the --max-memory limit instead of filling memory."""
    import gzip

    from precode_cli import budget
    from precode_cli.datasets import idx

    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (200_000).to_bytes(4, "big") + (1000).to_bytes(4, "big") + (1).to_bytes(4, "big")
    bomb.write_bytes(gzip.compress(header + bytes(200_000_000), compresslevel=9))
    assert bomb.stat().st_size < 1_000_000
    budget.set_max_memory(0.05)
    try:
        with pytest.raises(UserError, match="decompressing .* over the limit of 51 MiB"):
            idx.read_idx(bomb)
    finally:
        budget.set_max_memory(None)
    assert idx.read_idx(bomb).shape == (200_000, 1000, 1)  # within the default limit it is read


def test_a_tensors_dataset_with_a_huge_label_or_size_is_refused_at_once(tmp_path):
    """A label of 10**12 once made precode name 10**12 classes; a file's declared size is budgeted before loading."""
    from safetensors.torch import save_file

    from precode_cli import budget
    from precode_cli.datasets import tensors

    path = tmp_path / "huge-label.safetensors"
    save_file({"images": torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "labels": torch.tensor([0, 10**12])}, str(path))
    with pytest.raises(UserError, match="has label 1000000000000; precode takes at most 100,000 classes"):
        tensors.load(path)
    path = tmp_path / "big.safetensors"
    save_file({"images": torch.zeros(64, 3, 32, 32, dtype=torch.uint8), "labels": torch.zeros(64, dtype=torch.int64)},
              str(path))
    budget.set_max_memory(0.0001)
    try:
        with pytest.raises(UserError, match="over the limit"):
            tensors.load(path)
    finally:
        budget.set_max_memory(None)
