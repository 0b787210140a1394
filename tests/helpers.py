"""Helpers shared by the tests: the in-process CLI runner, file digests, the one-line error check."""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from precode_cli.app import app

# Labels of the first built-in training images (fixed by the dataset's seed): victim 0 is class 4,
# victim 1 is class 0.
VICTIM_LABELS = {0: 4, 1: 0}
DUMP0 = "train-000000.safetensors"
TRUTH0 = "train-000000.truth.safetensors"


def invoke(*args: object):
    """Run `precode ARGS...` in-process; the result has exit_code, stdout, stderr and output."""
    runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def invoke_ok(*args: object):
    """Run `precode ARGS...` and fail the test with the command's output unless it exits 0."""
    result = invoke(*args)
    assert result.exit_code == 0, (
        f"precode {' '.join(map(str, args))} exited {result.exit_code}\n{result.output}\n{result.exception!r}"
    )
    return result


def tree_digest(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under the given files/directories (hidden files included)."""
    digest: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for path in files:
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def assert_one_line_error(result, *phrases: str) -> str:
    """Exit 2, exactly one line on stderr of the form 'Error: ...', no traceback; returns the message."""
    assert result.exit_code == 2, f"exit code {result.exit_code}, output:\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    message = lines[0]
    assert message.startswith("Error: "), message
    assert message.rstrip().endswith("."), message
    assert "Internal error" not in message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def copy_dump(src: Path, target: Path) -> Path:
    """Copy a gradient dump to `target` (a file path, or a folder to keep its name) with the shared model
    state it names (format version 2: `states/<sha256>.safetensors` beside it), as a user copies a dump."""
    import json
    import shutil

    from safetensors import safe_open

    src, target = Path(src), Path(target)
    if target.is_dir():
        target = target / src.name
    shutil.copy2(src, target)
    with safe_open(str(src), framework="pt") as f:
        state = (f.metadata() or {}).get("state")
    if state:
        sha = json.loads(state)["sha256"]
        (target.parent / "states").mkdir(exist_ok=True)
        shutil.copy2(src.parent / "states" / f"{sha}.safetensors", target.parent / "states" / f"{sha}.safetensors")
    return target
