"""The layering rule of docs/ARCHITECTURE.md: a stage imports only the stages below it.

Every import in greenarrow/lib (at module level or inside a function: a lazy
import is still a dependency) is read with `ast`; an import of a higher stage,
of a sibling stage of the same rank, or of greenarrow.bin fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "greenarrow" / "lib"

# Rank of each stage, lowest first. A stage may import stages of a lower rank
# only; stages of equal rank are siblings and may not import each other.
RANKS: dict[str, int] = {
    "core": 0,
    "config": 1,
    "smtp": 2,
    "dkim": 2,
    "routing": 3,
    "queue": 4,
    "simplemh": 5,
    "events": 6,
    "inject": 7,
    "deliver": 7,
    "local": 8,
    "feedback": 8,
    "tracker": 8,
    "ops": 9,
    "devtools": 10,
}


def stage_of(module: str) -> str | None:
    """The stage of a dotted module name under greenarrow.lib, or None."""
    parts = module.split(".")
    if parts[:2] != ["greenarrow", "lib"] or len(parts) < 3:
        return None
    return parts[2]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import statement in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from greenarrow.lib import stage` names the stage itself
            if node.module == "greenarrow.lib":
                found.extend((node.lineno, f"greenarrow.lib.{a.name}") for a in node.names)
    return found


def violations(lib: Path = LIB) -> list[str]:
    problems = []
    for path in sorted(lib.rglob("*.py")):
        relative = path.relative_to(lib)
        if len(relative.parts) == 1:
            if path.name != "__init__.py":
                problems.append(f"{relative}: a module outside every stage folder")
            continue
        stage = relative.parts[0]
        if stage not in RANKS:
            problems.append(f"{relative}: folder {stage!r} is not a stage of the layering rule")
            continue
        for line, module in imports_of(path):
            where = f"{relative}:{line}"
            if module == "greenarrow.bin" or module.startswith("greenarrow.bin."):
                problems.append(f"{where}: lib imports {module}")
                continue
            target = stage_of(module)
            if target is None or target == stage:
                continue
            if target not in RANKS:
                problems.append(f"{where}: imports {module}, which is in no stage")
            elif RANKS[target] >= RANKS[stage]:
                kind = "a sibling" if RANKS[target] == RANKS[stage] else "a higher"
                problems.append(f"{where}: {stage} imports {module}, {kind} stage ({target})")
    return problems


def test_every_lib_module_respects_the_layering_rule() -> None:
    assert violations() == []


def test_every_stage_package_has_an_empty_init() -> None:
    for stage in RANKS:
        init = LIB / stage / "__init__.py"
        if init.parent.is_dir():
            assert init.exists(), f"{init.parent} has no __init__.py"
            assert init.read_text().strip() == "", f"{init} must stay empty"


@pytest.mark.parametrize(
    ("stage", "source", "expected"),
    [
        ("core", "from greenarrow.lib.queue import entry\n", "a higher stage"),
        ("smtp", "from greenarrow.lib.dkim import signing\n", "a sibling stage"),
        ("queue", "def f():\n    from greenarrow.lib.inject import accept\n", "a higher stage"),
        ("ops", "import greenarrow.bin.smtpd\n", "lib imports greenarrow.bin.smtpd"),
        ("routing", "from greenarrow.lib import deliver\n", "a higher stage"),
    ],
)
def test_a_wrong_way_import_is_caught(tmp_path: Path, stage: str, source: str,
                                      expected: str) -> None:
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "__init__.py").write_text("")
    (tmp_path / stage / "bad.py").write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found


def test_a_right_way_import_passes(tmp_path: Path) -> None:
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "ok.py").write_text(
        "from greenarrow.lib.queue import entry\nfrom greenarrow.lib.core import paths\n")
    assert violations(tmp_path) == []
