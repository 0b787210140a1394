"""The reference docs name everything the code offers, so they cannot silently fall behind."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from precode_cli import fileformat
from precode_cli.app import app

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _sections(text: str) -> dict[str, str]:
    """Second-level sections of a markdown file, keyed by their heading."""
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    return {part.splitlines()[0].strip(): part for part in parts[1:]}


def test_cli_md_documents_every_command_and_option():
    sections = _sections((DOCS / "cli.md").read_text(encoding="utf-8"))
    group = typer.main.get_command(app)
    assert set(group.commands) == {"train", "capture-gradients", "attack", "evaluate"}
    for name, command in group.commands.items():
        section = sections.get(f"`precode {name}`")
        assert section is not None, f"docs/cli.md has no section for precode {name}"
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                if flag.startswith("--") and flag != "--config":
                    assert f"`{flag}`" in section, f"docs/cli.md does not document {flag} of precode {name}"
    for flag in ("--debug", "--version", "--config"):
        assert f"`{flag}" in (DOCS / "cli.md").read_text(encoding="utf-8")


def test_file_format_md_names_every_kind_and_required_key():
    text = (DOCS / "file-format.md").read_text(encoding="utf-8")
    assert "`format_version`" in text and f"{fileformat.FORMAT_VERSION}" in text
    for format_name in fileformat.FORMAT_NAMES.values():
        assert format_name in text, f"docs/file-format.md does not describe {format_name}"
    for kind, keys in fileformat.REQUIRED_METADATA.items():
        for key in keys:
            assert f"`{key}`" in text, f"docs/file-format.md does not describe metadata {key!r} of {kind} files"
