"""What the benchmarks that drive the command line share: one `precode` call, and a time a file recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def precode(*args: object) -> None:
    """One CLI call in a fresh process, as a user's script makes it; a failure stops the benchmark with the
    command's own message."""
    command = [sys.executable, "-m", "precode_cli", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def recorded_seconds(path: Path) -> float:
    """The attack time a reconstruction file records."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return float(json.loads(f.metadata()["attack"])["seconds"])
