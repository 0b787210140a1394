"""Shared fixtures: an in-process CLI runner and gradient dumps captured once per test session.

Dumps of the paper's MLP (about 33 MB each, 40 MB with PRECODE) are captured with the real
`capture-gradients` command into a session temporary directory; tests that need to damage or
change a dump copy it into their own `tmp_path` first, so the shared dumps stay pristine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import DUMP0, TRUTH0, copy_dump, invoke_ok


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """`attack --threads N` run in-process sets torch's thread count for the whole process; put it back so
    a later test's in-process run sums floats as a fresh process does."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dumps(tmp_path_factory) -> dict[str, Path]:
    """GRADS_DIRs captured once with the real command, untrained MLP, built-in data, seed 0.

    plain / precode:                    victim 0, labels shared
    plain_nolabels / precode_nolabels:  victims 0 and 1 (one dump each), --no-share-labels
    """
    from precode_cli.cli_support import tune_allocator

    tune_allocator()  # what `precode attack` does; keeps the in-process attacks of the tests fast
    root = tmp_path_factory.mktemp("grads")
    plans = {
        "plain": ["--model", "mlp", "--indices", "0:1"],
        "precode": ["--model", "mlp", "--defense", "precode", "--indices", "0:1"],
        "plain_nolabels": ["--model", "mlp", "--indices", "0:2", "--no-share-labels"],
        "precode_nolabels": ["--model", "mlp", "--defense", "precode", "--indices", "0:2", "--no-share-labels"],
    }
    out = {}
    for name, args in plans.items():
        invoke_ok("capture-gradients", *args, "--seed", 0, "--out", root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def recon_nolabels(dumps, tmp_path_factory) -> dict[str, Path]:
    """RECON_DIRs of a 1-iteration attack on the dumps without labels (labels must be recovered)."""
    root = tmp_path_factory.mktemp("recon")
    out = {}
    for name in ("plain_nolabels", "precode_nolabels"):
        invoke_ok("attack", dumps[name], "--iterations", 1, "--seed", 0, "--out", root / name)
        out[name] = root / name
    return out


@pytest.fixture
def dump_copy(dumps, tmp_path) -> Path:
    """A private copy of the plain dump (its truth file and its states/ folder) that a test may damage."""
    target = tmp_path / "grads"
    target.mkdir()
    copy_dump(dumps["plain"] / DUMP0, target / DUMP0)  # with the shared model state it names (states/)
    shutil.copy2(dumps["plain"] / TRUTH0, target / TRUTH0)
    return target / DUMP0
