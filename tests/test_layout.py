"""The architecture's one rule: the core imports neither `attacks` nor `defenses`.

Commands and stages wire the three together; `attacks` and `defenses` use the core. Checked on
the source (imports anywhere in a module, including inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIRING = {"precode_cli/stages", "precode_cli/commands", "precode_cli/flower"}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_neither_attacks_nor_defenses():
    core = [p for p in (ROOT / "precode_cli").rglob("*.py") if str(p.parent.relative_to(ROOT)) not in WIRING]
    assert len(core) >= 10
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_top_levels(p) & {"attacks", "defenses"}) for p in core}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_attacks_and_defenses_do_not_import_the_app_or_each_other():
    for package, other in (("attacks", "defenses"), ("defenses", "attacks")):
        for path in (ROOT / package).rglob("*.py"):
            imported = _imported_top_levels(path)
            assert other not in imported, f"{path.relative_to(ROOT)} imports {other}"
            source = path.read_text(encoding="utf-8")
            assert "precode_cli.stages" not in source and "precode_cli.commands" not in source, path
