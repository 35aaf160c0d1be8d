"""The docs stay true to the code: docs/design.md's table of modules names every module of the
package, and names nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
TABLE_HEADING = "## Modules, in the order data flows through them"


def _table_rows() -> list[str]:
    """The rows of the first table under the modules heading (header and rule excluded)."""
    text = DESIGN.read_text(encoding="utf-8")
    assert TABLE_HEADING in text, f"docs/design.md has no section {TABLE_HEADING!r}"
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the modules section of docs/design.md has no table"
    return rows[2:]


def _expand(path: str) -> list[str]:
    """``kmjax/experiment/{plan,processes}.py`` -> both paths; a path without braces -> itself."""
    m = re.fullmatch(r"(.*)\{([^{}]*)\}(.*)", path)
    if m is None:
        return [path]
    return [p for part in m.group(2).split(",") for p in _expand(m.group(1) + part.strip() + m.group(3))]


def named_paths() -> set[str]:
    """Every ``kmjax/...`` path the table names in backticks, in its first (module) column."""
    paths = set()
    for row in _table_rows():
        module_cell = row.strip().strip("|").split("|")[0]
        for quoted in re.findall(r"`([^`]+)`", module_cell):
            if quoted.startswith("kmjax/"):
                paths.update(_expand(quoted))
    return paths


def package_modules() -> set[str]:
    """Every ``kmjax/**/*.py`` module but the packages' ``__init__.py`` and the shipped configs."""
    modules = set()
    for path in (ROOT / "kmjax").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or rel.startswith("kmjax/configs/"):
            continue
        modules.add(rel)
    return modules


def test_expand_grouped_paths():
    assert _expand("kmjax/experiment/{plan, processes}.py") == ["kmjax/experiment/plan.py",
                                                                 "kmjax/experiment/processes.py"]
    assert _expand("kmjax/cli.py") == ["kmjax/cli.py"]


def test_the_module_table_names_every_module():
    missing = sorted(package_modules() - named_paths())
    assert not missing, f"docs/design.md's module table does not name {missing}: add a row for each"


def test_every_path_in_the_module_table_exists():
    named = named_paths()
    assert named, "docs/design.md's module table names no kmjax/ path in backticks"
    absent = sorted(p for p in named if not (ROOT / p).exists())
    assert not absent, f"docs/design.md's module table names {absent}, which do not exist"
