"""Output folders (issue "Files from others", items 4 and 5): runs that cannot mix, folders that cannot be
redirected, and writes that fail in one sentence.

1. One writer per folder: a command holds `OUT/.precode.lock` (flock) from its first write to its end;
   a second command into the same folder is refused, in a real second process too.
2. Nothing outside --out is read, written or deleted through a symlink planted in it: `checkpoints/`,
   files inside it, and the lock file's name.
3. An --out that is an existing file, or whose name is too long, is refused before any work.
4. Long final names get a temporary name that fits; a write the operating system refuses (full disk,
   read-only file system, file size limit) is one sentence, and the earlier result stays whole.

See docs/security.md ("Outputs").
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from helpers import DUMP0, assert_one_line_error, invoke, invoke_ok, tree_digest, copy_dump
from precode_cli import atomic, fileformat
from precode_cli.errors import UserError
from precode_cli.outdir import LOCK_NAME, OutputDir

SMALL = ["--model", "mlp", "--width", 16, "--image-size", 8]
TRAIN = ["train", *SMALL, "--epochs", 1, "--subset", 64]


def capture_args(out: Path, *extra: object) -> list[object]:
    return ["capture-gradients", *SMALL, "--indices", "0:2", "--seed", 0, "--out", out, *extra]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A GRADS_DIR (two dumps of a 16-wide MLP on 8x8 images) and its RECON_DIR, made with the real commands."""
    root = tmp_path_factory.mktemp("output-dirs")
    invoke_ok(*capture_args(root / "grads"))
    invoke_ok("attack", root / "grads", "--iterations", 1, "--out", root / "recon")
    return {"grads": root / "grads", "recon": root / "recon"}


def command(name: str, small: dict[str, Path], out: Path) -> list[object]:
    """A small, valid run of each command into `out`."""
    return {
        "train": [*TRAIN, "--out", out],
        "capture-gradients": capture_args(out),
        "attack": ["attack", small["grads"], "--iterations", 1, "--out", out],
        "evaluate": ["evaluate", small["recon"], "--truth", small["grads"], "--out", out],
    }[name]


COMMANDS = ["train", "capture-gradients", "attack", "evaluate"]


def assert_fails_in_one_sentence(result, *phrases: str) -> str:
    """A refusal after the work began: exit 2, no traceback, and the error is one sentence, the last line
    on stderr (after the command's status lines); returns it."""
    assert result.exit_code == 2, f"exit code {result.exit_code}, output:\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "Internal error" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.stderr
    message = lines[-1]
    assert message.rstrip().endswith(".") and message.count(". ") == 0, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def consistent_capture(out: Path) -> int:
    """Every truth file in `out` belongs to the dump beside it (by its recorded SHA-256); returns their number."""
    truths = sorted(out.glob("*.truth.safetensors"))
    for truth in truths:
        dump = out / truth.name.replace(".truth.safetensors", ".safetensors")
        recorded = fileformat.read(truth, "truth").meta["dump"]["sha256"]
        assert recorded == fileformat.sha256_of(dump), truth.name
    assert len(truths) == len(list(out.glob("*.safetensors"))) // 2
    return len(truths)


# --- 1. one writer per folder -----------------------------------------------------------------------

SLOW_CAPTURE = """
import os, sys, time
from precode_cli import fileformat
original = fileformat.write
go = os.environ["PRECODE_TEST_GO"]

def paused_write(path, kind, *args, **kwargs):  # the real writer; after the first dump, wait until the test says go
    original(path, kind, *args, **kwargs)
    if kind == "state":  # the model state the dumps share comes first; pause once a dump is written
        return
    deadline = time.monotonic() + 120
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)

fileformat.write = paused_write
from precode_cli.app import main
sys.argv = ["precode", *sys.argv[1:]]
main()
"""


def test_two_captures_cannot_write_into_one_folder(tmp_path):
    """Capture A runs in its own process; capture B into the same folder, even with --force, is refused
    while A runs, and A's dumps and truth files stay consistent with each other."""
    out = tmp_path / "grads"
    first, go = tmp_path / "a-first-dump", tmp_path / "go"
    args = [str(a) for a in ["capture-gradients", *SMALL, "--indices", "0:10", "--seed", 0, "--out", out]]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CAPTURE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", "PRECODE_TEST_GO": str(go)})
    try:
        deadline = time.monotonic() + 120
        while not (out / DUMP0).exists():  # A writes its first dump only once it holds the lock
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "capture A never wrote its first dump"
            time.sleep(0.05)
        shutil.copy2(out / DUMP0, first)

        result = invoke(*capture_args(out, "--force"))
        assert_one_line_error(result, "another precode command is writing to", str(out), str(out / LOCK_NAME),
                              "choose another --out")
        assert proc.poll() is None, "capture A ended before B tried: the test proved nothing"
    finally:
        go.write_text("go")
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert consistent_capture(out) == 10
    assert (out / DUMP0).read_bytes() == first.read_bytes()  # B never replaced A's files

    invoke_ok(*capture_args(out, "--force"))  # A is gone, and so is its lock: nothing stale is left behind
    consistent_capture(out)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_the_lock(small, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another precode command would
        before = tree_digest(tmp_path)
        result = invoke(*command(name, small, out))
        assert_one_line_error(result, "another precode command is writing to", str(out / LOCK_NAME))
        assert tree_digest(tmp_path) == before
    finally:
        os.close(fd)
    invoke_ok(*command(name, small, out))
    assert (out / LOCK_NAME).is_file() and (out / LOCK_NAME).stat().st_size == 0  # left, empty, for the next run


def test_a_symlink_at_the_lock_name_is_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not precode's")
    out = tmp_path / "grads"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(outside)
    result = invoke(*capture_args(out))
    assert_one_line_error(result, str(out / LOCK_NAME), "symbolic link", "precode did not create")
    assert outside.read_text() == "not precode's"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# --- 2. planted symlinks never lead outside --out -----------------------------------------------------


def outside_folder(tmp_path: Path, *names: str) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in names:
        (outside / name).write_bytes(b"someone else's file: " + name.encode())
    return outside


@pytest.mark.parametrize("extra", [["--force", "--checkpoint-epochs", 1], ["--resume"]], ids=["force", "resume"])
def test_train_never_follows_a_planted_checkpoints_symlink(tmp_path, extra):
    outside = outside_folder(tmp_path, "epoch-0000.safetensors", "epoch-0001.safetensors", "resume.safetensors",
                             "notes.txt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)
    before = tree_digest(outside)
    result = invoke(*TRAIN, *extra, "--out", run)
    assert_one_line_error(result, str(run / "checkpoints"), "is a symbolic link that precode did not create")
    assert tree_digest(outside) == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("extra", [["--force"], ["--resume"]], ids=["force", "resume"])
def test_attack_never_follows_a_planted_checkpoints_symlink(small, tmp_path, extra):
    outside = outside_folder(tmp_path, DUMP0, "train-000001.safetensors", "notes.txt")
    recon = tmp_path / "recon"
    recon.mkdir()
    (recon / "checkpoints").symlink_to(outside, target_is_directory=True)
    before = tree_digest(outside)
    result = invoke("attack", small["grads"], "--iterations", 2, "--checkpoint-iterations", 1, *extra, "--out", recon)
    assert_one_line_error(result, str(recon / "checkpoints"), "is a symbolic link that precode did not create")
    assert tree_digest(outside) == before
    assert sorted(p.name for p in recon.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("stage", ["attack-resume", "attack-force", "train-force"])
def test_a_symlink_inside_checkpoints_is_refused(small, tmp_path, stage):
    """A glob of checkpoints/ that meets a symlink refuses it instead of reading (or deleting) through it."""
    outside = outside_folder(tmp_path, "elsewhere.safetensors")
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    planted = out / "checkpoints" / ("epoch-0001.safetensors" if stage.startswith("train") else DUMP0)
    planted.symlink_to(outside / "elsewhere.safetensors")
    before = tree_digest(outside)
    if stage.startswith("train"):
        result = invoke(*TRAIN, "--force", "--out", out)
    else:
        result = invoke("attack", small["grads"], "--iterations", 2, f"--{stage.split('-')[1]}", "--out", out)
    assert_one_line_error(result, str(planted), "is a symbolic link that precode did not create")
    assert tree_digest(outside) == before and planted.is_symlink()


def test_outputdir_subdir_refuses_links_and_files(tmp_path):
    out = OutputDir(tmp_path)
    assert out.subdir("made") == tmp_path / "made" and (tmp_path / "made").is_dir()
    assert out.subdir("absent", create=False) == tmp_path / "absent" and not (tmp_path / "absent").exists()
    (tmp_path / "link").symlink_to(tmp_path / "made", target_is_directory=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="symbolic link that precode did not create"):
        out.subdir("link")
    with pytest.raises(UserError, match="is a file where precode keeps a folder"):
        out.subdir("file", create=False)
    with pytest.raises(UserError, match="symbolic link"):
        out.remove("link", pattern="*")


def test_outputdir_remove_unlinks_links_not_their_targets(tmp_path):
    outside = outside_folder(tmp_path, "epoch-0001.safetensors")
    out = OutputDir(tmp_path / "run")
    folder = out.subdir("checkpoints")
    (folder / "epoch-0001.safetensors").symlink_to(outside / "epoch-0001.safetensors")
    (folder / "epoch-0002.safetensors").write_text("old")
    (folder / "resume.safetensors").write_text("kept")
    before = tree_digest(outside)
    out.remove("checkpoints", pattern="epoch-*.safetensors", drop_if_empty=True)
    assert tree_digest(outside) == before
    assert sorted(p.name for p in folder.iterdir()) == ["resume.safetensors"]
    out.remove("checkpoints", names=["resume.safetensors"], drop_if_empty=True)
    assert not folder.exists()


# --- 3. --out itself ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_an_out_that_is_a_file_is_refused(small, tmp_path, name):
    out = tmp_path / "results.txt"
    out.write_text("my notes, not a folder")
    before = tree_digest(tmp_path)
    result = invoke(*command(name, small, out))
    assert_one_line_error(result, f"--out {out} is an existing file")
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_a_too_long_out_is_one_sentence(tmp_path):
    out = tmp_path / ("x" * 300)  # over any file system's name limit: a real ENAMETOOLONG
    result = invoke(*capture_args(out))
    assert_one_line_error(result, "File name too long", "choose a shorter --out")
    assert list(tmp_path.iterdir()) == []


# --- 4. names near the limit, and writes the operating system refuses ------------------------------------


def test_a_long_final_name_gets_a_temporary_name_that_fits(tmp_path):
    final = tmp_path / ("r" * 238 + ".safetensors")  # 250 bytes: ".NAME.tmp-XXXXXXXX" would be 264
    assert len(final.name) == 250
    limit = atomic.name_max(tmp_path)
    with atomic.atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and len(os.fsencode(tmp.name)) <= limit
        assert tmp.name.startswith(".rrrr") and ".tmp-" in tmp.name and not tmp.name.endswith(".safetensors")
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temporary file left


def test_attack_writes_a_reconstruction_with_a_long_name(small, tmp_path):
    """A dump named near the limit gives a reconstruction of the same name (its temporary name is shortened)."""
    grads = tmp_path / "grads"
    grads.mkdir()
    long_name = "d" * 238 + ".safetensors"
    copy_dump(small["grads"] / DUMP0, grads / long_name)  # with the model state it names
    invoke_ok("attack", grads, "--iterations", 1, "--out", tmp_path / "recon")
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == [LOCK_NAME, long_name]
    fileformat.read(tmp_path / "recon" / long_name, "reconstruction")


def test_refuse_overwrite_names(tmp_path):
    dangling = tmp_path / "model.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="already exists"):  # a dangling symlink is replaced too: it counts
        atomic.refuse_overwrite([dangling], force=False)
    atomic.refuse_overwrite([dangling], force=True)
    with pytest.raises(UserError, match="300 bytes long"):  # refused before any work, even with --force
        atomic.refuse_overwrite([tmp_path / ("n" * 300)], force=True)


def test_a_full_disk_is_one_sentence_and_keeps_the_earlier_result(tmp_path, monkeypatch):
    out = tmp_path / "grads"
    invoke_ok(*capture_args(out))
    before = tree_digest(out)

    def half_then_full(tensors, filename, metadata=None):  # what safetensors raises when the disk fills up
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(fileformat, "save_file", half_then_full)
    result = invoke(*capture_args(out, "--force"))
    assert_fails_in_one_sentence(result, f"cannot write {out / DUMP0}: No space left on device", "free some space",
                          "earlier version")
    assert tree_digest(out) == before  # the earlier dump and truth file, and no temporary file
    consistent_capture(out)


def test_a_full_disk_while_writing_the_report(small, tmp_path, monkeypatch):
    """The report (report.write_all) and plots write through atomic too."""
    out = tmp_path / "report"
    invoke_ok(*command("evaluate", small, out))
    before = tree_digest(out)
    original = Path.write_text

    def full(self, *args, **kwargs):
        if self.parent == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    result = invoke(*command("evaluate", small, out), "--force")
    assert_fails_in_one_sentence(result, f"cannot write {out / 'metrics.json'}", "No space left on device")
    assert tree_digest(out) == before


def test_a_read_only_file_system_is_one_sentence(tmp_path, monkeypatch):
    """Tests run as root, where chmod stops nothing: the file system's refusal is simulated at mkstemp,
    for the training curves (written by precode_cli.plots)."""
    run = tmp_path / "run"
    invoke_ok(*TRAIN, "--out", run)
    curves = (run / "curves.png").read_bytes()
    original = atomic.tempfile.mkstemp

    def read_only(*args, prefix="", **kwargs):
        if prefix.startswith(".curves.png"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(run))
        return original(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    result = invoke(*TRAIN, "--force", "--out", run)
    assert_fails_in_one_sentence(result, f"cannot write {run / 'curves.png'}: Read-only file system", "writable")
    assert (run / "curves.png").read_bytes() == curves
    assert not [p for p in run.rglob(".*.tmp-*")]


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))


def test_a_real_write_error_in_a_real_process(tmp_path):
    """A real refusal by the kernel (file size limit: EFBIG) inside safetensors' own writer, in a fresh process."""
    out = tmp_path / "grads"
    # Version 1 keeps the whole model in each dump (a version-2 dump of this MLP is under 16 kB, its state apart).
    invoke_ok(*capture_args(out, "--format-version", 1))
    assert (out / DUMP0).stat().st_size > 16_000
    before = tree_digest(out)
    proc = subprocess.run([sys.executable, "-m", "precode_cli",
                           *map(str, capture_args(out, "--force", "--format-version", 1))],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"}, timeout=120,
                          preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], proc.stderr
    assert lines[-1].startswith(f"Error: cannot write {out / DUMP0}: File too large; "), proc.stderr
    assert tree_digest(out) == before
