"""What README.md and docs/ claim, checked against the code: options per command, files per stage, table width.

test_docs.py checks that the docs name everything; this file checks that what they say is true:
the options the README says a command takes, the files the README's "The stages" block says each
stage writes (by running the README's own stage chain on a tiny model), the files each stage reads
or never reads (docs/file-format.md's table, tried by removing or damaging the others), the width
of piped tables (docs/cli.md), and what the README says the quick start leaves behind.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from helpers import invoke_ok, copy_dump
from precode_cli import fileformat, plots
from precode_cli.app import app
from precode_cli.stages.evaluate import REPORT_FILES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CLI_MD = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
FILE_FORMAT_MD = (ROOT / "docs" / "file-format.md").read_text(encoding="utf-8")
QUICKSTART = (ROOT / "examples" / "quickstart.sh").read_text(encoding="utf-8")
TRUTH = ".truth.safetensors"
# Added to the README's stage chain so that it runs in seconds: a 16-wide MLP on 8x8 images, 2 attack iterations.
TINY = {"train": ["--width", "16", "--image-size", "8", "--subset", "64"], "attack": ["--iterations", "2"]}


def _commands() -> dict[str, object]:
    return dict(typer.main.get_command(app).commands)


def _flags(command: object) -> set[str]:
    return {flag for param in command.params for flag in [*param.opts, *param.secondary_opts] if flag.startswith("--")}


def _global_flags() -> set[str]:
    group = typer.main.get_command(app)
    return {flag for param in group.params for flag in [*param.opts, *param.secondary_opts] if flag.startswith("--")}


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _precode_lines(text: str) -> list[list[str]]:
    """Every `precode COMMAND ...` command line (continuations joined) in a script or code block, as tokens."""
    lines = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = re.sub(r"^\s*(\$PRECODE|precode)\b", "precode", line)
        if line.startswith("precode "):
            line = line.split(" #")[0].split(" > ")[0]
            try:
                tokens = shlex.split(line, posix=True)
            except ValueError:  # a quote that opens on this line and closes on a later one
                tokens = line.split()
            lines.append(tokens[1:])
    return lines


def _stage_chain() -> list[list[str]]:
    """The README's bash block that chains train, capture-gradients, attack and evaluate."""
    for block in _code_blocks(README):
        if "->" in block:
            continue  # the block that lists each stage's outputs
        commands = _precode_lines(block)
        if [c[0] for c in commands] == ["train", "capture-gradients", "attack", "evaluate"]:
            return commands
    raise AssertionError("README.md has no bash block with the four stages in order")


# --- options per command -------------------------------------------------------------------------------------


def test_readme_options_every_command_takes():
    """'Every command takes A, B and C; X, Y and Z also take D' holds, and no other command takes D."""
    names = r"`[a-z-]+`(?:, `[a-z-]+`)*(?:\s+and\s+`[a-z-]+`)?"
    match = re.search(rf"Every command takes (.*?); ({names})\s+also\s+take\s+(`--[a-z-]+`(?:, `--[a-z-]+`)*)", README,
                      re.DOTALL)
    assert match, "README.md no longer says which options every command takes; update this test with it"
    every = re.findall(r"`(--[a-z-]+)", match.group(1))
    some = re.findall(r"`([a-z-]+)`", match.group(2))
    extra = re.findall(r"`(--[a-z-]+)", match.group(3))
    commands = _commands()
    assert every and some and extra
    assert set(some) < set(commands), f"README names commands that do not exist: {set(some) - set(commands)}"
    for name, command in commands.items():
        for flag in every:
            assert flag in _flags(command), f"README says every command takes {flag}; precode {name} does not"
        for flag in extra:
            said = name in some
            assert (flag in _flags(command)) == said, (
                f"README says {flag} is taken by {', '.join(some)} only; precode {name} "
                f"{'does not take' if said else 'takes'} it")


def test_every_option_in_readme_and_docs_examples_exists():
    """Each `precode COMMAND --option` in the README's and docs' code blocks and in the example scripts is real."""
    commands, global_flags = _commands(), _global_flags()
    sources = {"README.md": "\n".join(_code_blocks(README)), "examples/quickstart.sh": QUICKSTART}
    for doc in sorted((ROOT / "docs").glob("*.md")):
        sources[f"docs/{doc.name}"] = "\n".join(_code_blocks(doc.read_text(encoding="utf-8")))
    checked = 0
    for source, text in sources.items():
        for tokens in _precode_lines(text):
            while tokens and tokens[0] in global_flags:
                tokens = tokens[1:]
            if not tokens or tokens[0].startswith("-") or tokens[0] not in commands:
                continue  # `precode --help`, `precode --version` and the like
            known = _flags(commands[tokens[0]]) | global_flags | {"--help"}
            for token in tokens[1:]:
                flag = token.split("=")[0]
                if flag.startswith("--"):
                    assert flag in known, f"{source}: precode {tokens[0]} has no option {flag}"
                    checked += 1
    assert checked > 20


def test_readme_dataset_options_exist():
    """'On your own data or a standard set: `--dataset ...`' names options train and capture-gradients take."""
    line = re.search(r"On your own data.*?\n\n", README, re.DOTALL)
    assert line
    flags = set(re.findall(r"(--[a-z-]+)", line.group(0)))
    assert flags
    for name in ("train", "capture-gradients"):
        missing = flags - _flags(_commands()[name])
        assert not missing, f"README suggests {sorted(missing)} for your own data; precode {name} lacks them"


# --- outputs per stage and files each stage reads ------------------------------------------------------------


def _stage_outputs() -> dict[str, tuple[str, list[str]]]:
    """README's "The stages" block: {command: (DIR placeholder, [file patterns it says the stage writes])}."""
    section = README.split("## The stages", 1)[1]
    block = _code_blocks(section)[0]
    outputs: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in block.splitlines():
        if "->" in line:
            current = line.split("->")[0].split()[1]
            text = line.split("->", 1)[1]
        elif current and line.startswith(" "):
            text = line
        else:
            continue
        text = re.split(r"\s{2,}", text.strip())[0]  # drop the comment column
        text = re.sub(r"\(.*?\)", "", text)  # "(+ a table)"
        items = [item.strip() for item in text.split(",") if item.strip()]
        directory, first = items[0].split("/", 1)
        dir_name, files = outputs.get(current, (directory, []))
        outputs[current] = (dir_name, files + [first, *items[1:]])
    return outputs


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """The README's stage chain, run as written in a temporary folder, with TINY options added."""
    root = tmp_path_factory.mktemp("readme-chain")
    folders = {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for tokens in _stage_chain():
            command = tokens[0]
            result = invoke_ok(*tokens, *TINY.get(command, []))
            folders[command] = root / tokens[tokens.index("--out") + 1]
            if command == "evaluate":
                folders["evaluate_stdout"] = result.stdout
    finally:
        os.chdir(cwd)
    return folders


def test_readme_stage_chain_writes_the_files_the_readme_lists(chain):
    outputs = _stage_outputs()
    assert set(outputs) == {"train", "capture-gradients", "attack", "evaluate"}
    for command, (_, files) in outputs.items():
        folder = chain[command]
        present = {p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()}
        for pattern in files:
            longer = [f.replace("<id>", "*") for f in files if f != pattern and f.endswith(pattern.split(">")[-1])
                      and len(f) > len(pattern)]
            glob = pattern.replace("<id>", "*")
            matches = [name for name in present if Path(name.rstrip("/")).match(glob.rstrip("/"))
                       and name.endswith("/") == glob.endswith("/")
                       and not any(Path(name).match(other) for other in longer)]
            assert matches, f"README says precode {command} writes {pattern}; {folder} holds {sorted(present)}"
    assert "evaluation" in chain["evaluate_stdout"], "README says evaluate prints a table"
    assert set(outputs["evaluate"][1]) == set(REPORT_FILES)


def _stage_table() -> dict[str, tuple[str, str]]:
    table = FILE_FORMAT_MD.split("| stage | reads | never reads |", 1)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_file_format_table_names_every_stage():
    assert set(_stage_table()) == set(_commands())


def test_attack_reads_only_the_dumps(chain, tmp_path):
    """docs/file-format.md: attack never reads truth files, model files, or any path a file names."""
    never = _stage_table()["attack"][1]
    assert "truth files" in never and "model files" in never
    grads = tmp_path / "grads"
    grads.mkdir()
    for dump in chain["capture-gradients"].glob("*.safetensors"):
        if dump.name.endswith(TRUTH):
            (grads / dump.name).write_bytes(b"not a truth file: attack must not open it")
        else:
            copy_dump(dump, grads / dump.name)  # with the states/ folder it names (a hash, not a path)
    run = tmp_path / "run"  # the run the dumps name (capture.run) is gone
    invoke_ok("attack", grads, "--iterations", 1, "--out", tmp_path / "recon")
    assert not run.exists()
    assert len(list((tmp_path / "recon").glob("*.safetensors"))) == len(list(grads.glob("*.safetensors"))) // 2


def test_evaluate_reads_only_reconstructions_and_truth_files(chain, tmp_path):
    """docs/file-format.md: evaluate never reads dumps, model files or run folders."""
    never = _stage_table()["evaluate"][1]
    assert "dumps" in never and "model files" in never and "run folders" in never
    truth, recon = tmp_path / "truth", tmp_path / "recon"
    truth.mkdir()
    for path in chain["capture-gradients"].glob("*.safetensors"):
        if path.name.endswith(TRUTH):
            shutil.copy2(path, truth / path.name)
        else:
            (truth / path.name).write_bytes(b"not a dump: evaluate must not open it")
    shutil.copytree(chain["attack"], recon)
    for name in ("model.safetensors", "run.yaml"):  # a run folder where the truth files say it is, damaged
        assert (chain["train"] / name).exists()
    saved = {p: p.read_bytes() for p in chain["train"].rglob("*") if p.is_file()}
    try:
        for path in saved:
            path.write_bytes(b"evaluate must not open this")
        invoke_ok("evaluate", recon, "--truth", truth, "--out", tmp_path / "report")
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    for name in REPORT_FILES:
        assert (tmp_path / "report" / name).is_file()


def test_capture_reads_a_model_file_and_not_training_states(chain, tmp_path):
    """docs/file-format.md: capture reads a model file; it never reads training states."""
    assert "training states" in _stage_table()["capture-gradients"][1]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy2(chain["train"] / "model.safetensors", run / "model.safetensors")
    (run / "checkpoints" / "resume.safetensors").write_bytes(b"not a training state: capture must not open it")
    invoke_ok("capture-gradients", run, "--indices", "0:1", "--out", tmp_path / "grads")
    assert len(list((tmp_path / "grads").glob(f"*{TRUTH}"))) == 1


# --- piped table width ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [None, "80"])
def test_cli_md_piped_table_width(columns):
    """docs/cli.md: tables piped or redirected are laid out for N columns, or for $COLUMNS when it is set."""
    match = re.search(r"laid\s+out\s+for\s+(\d+)\s+columns,\s+or\s+for\s+`\$COLUMNS`", CLI_MD)
    assert match, "docs/cli.md no longer says how wide piped tables are; update this test with it"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns:
        env["COLUMNS"] = columns
    width = subprocess.run([sys.executable, "-c", "from precode_cli.cli_support import stdout; print(stdout.width)"],
                           env=env, stdout=subprocess.PIPE, check=True, text=True, cwd=ROOT).stdout.strip()
    assert int(width) == int(columns or match.group(1))


# --- the quick start -----------------------------------------------------------------------------------------


def test_readme_quick_start_command_and_outputs():
    """The README's first command runs the quick start, whose outputs are those the README names."""
    first = _code_blocks(README)[0].strip()
    assert first == "python3 -m venv .venv && . .venv/bin/activate && pip install . && bash examples/quickstart.sh"
    assert re.search(r"^OUT=\$\{1:-quickstart-out\}$", QUICKSTART, re.MULTILINE)
    intro = README.split("## The stages", 1)[0]
    named = set(re.findall(r"`quickstart-out/report/([\w.]+)`", intro))
    assert named, "README no longer names the quick start's outputs; update this test"
    drawn = set(re.findall(r"\$OUT/report/([\w.]+)\"", QUICKSTART))
    assert named <= set(REPORT_FILES) | drawn, f"README names {named - set(REPORT_FILES) - drawn}, not written"


def test_quick_start_trains_nothing_and_measures_its_time():
    """The README says the quick start trains nothing: then it may not quote accuracies, and its time is measured."""
    assert "trains\nnothing" in README or "trains nothing" in README
    commands = [tokens[0] for tokens in _precode_lines(QUICKSTART)]
    assert commands == ["capture-gradients", "attack", "evaluate"], commands
    for tokens in _precode_lines(QUICKSTART):
        if tokens[0] == "capture-gradients":
            assert not [t for t in tokens[1:] if not t.startswith("-") and "runs" in t], "captures from a run"
    note = QUICKSTART.split('note="', 1)[1].split('"\n', 1)[0]
    assert "accuracy is" not in note and "minutes" not in note
    assert "$elapsed" in note and "measured" in note
    assert "python -m precode_cli.plots story" in QUICKSTART.replace("$PYTHON", "python")


def test_story_figure_from_a_report(chain, tmp_path, monkeypatch):
    """plots.story, which the quick start calls, draws from a report folder (and training histories) alone."""
    monkeypatch.chdir(chain["evaluate"].parent)  # the report records relative folders, as the README's chain wrote
    originals, groups = plots.story_panels(chain["evaluate"])
    assert originals and [g["caption"] for g in groups] == ["PRECODE"]
    assert len(groups[0]["cells"]) == len(originals)
    assert plots.plain_defense_name("none") == "no defense"
    out = tmp_path / "story.png"
    assert plots.main(["story", str(chain["evaluate"]), str(out),
                       f"PRECODE={chain['train'] / 'history.json'}"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert fileformat.FORMAT_NAMES  # the figure read the files through fileformat (imported for it)
