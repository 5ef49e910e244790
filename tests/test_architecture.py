"""The layout keeps its layering (docs/design.md): each subpackage imports only from the layers below it, the core
never imports the recipes, no module grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "swp_plugin"

#: subpackage (or top-level module) -> what it may import from swp_plugin (besides itself)
ALLOWED = {
    "utils": set(),
    "layers": {"utils"},
    "skeleton": {"utils", "layers"},
    "measure": {"utils", "layers", "skeleton"},
    "models": set(),
    "pruning": {"utils", "layers", "skeleton", "measure"},
    "persistence": {"utils", "layers", "deployment"},  # deployment: to rebuild a saved deployed model
    "deployment": {"utils", "layers", "skeleton", "measure", "pruning"},
    "testing": {"utils", "layers", "skeleton", "measure", "pruning", "models", "persistence", "deployment", "interop"},
    "interop": {"utils", "layers", "skeleton", "pruning"},
    "cli": {"utils", "layers", "measure", "pruning", "persistence", "models"},
    "recipes": {"utils", "layers", "skeleton", "measure", "pruning", "persistence", "models", "deployment"},
}
#: deprecated aliases of moved modules (they re-export the recipes and warn)
SHIMS = {"continual", "baselines", "data", "training"}
MAX_LINES = 400


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set:
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for swp_plugin/x.py, 1 for swp_plugin/sub/x.py, ...
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb out of the file's package
                parts = list(path.relative_to(PACKAGE).parts[:-1])
                up = node.level - 1
                base = parts[: len(parts) - up] if up <= depth else None
                if base is None:
                    continue
                target = base + (node.module.split(".") if node.module else [])
                if not target:
                    found.update(alias.name for alias in node.names)
                else:
                    found.add(target[0])
            elif node.module and node.module.startswith("swp_plugin."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("swp_plugin."))
    return found


def test_each_subpackage_imports_only_from_below():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit in SHIMS or unit in ("__init__", "__main__"):
            continue
        bad = _imported_units(path) - ALLOWED[unit] - {unit}
        if bad:
            problems.append(f"{path.relative_to(PACKAGE)} imports {sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_the_core_never_imports_the_recipes():
    core = [p for p in PACKAGE.rglob("*.py") if _unit(p) not in {"recipes"} | SHIMS]
    assert all("recipes" not in _imported_units(p) for p in core)


def test_modules_stay_short():
    long = [f"{p.relative_to(PACKAGE)}: {len(p.read_text().splitlines())}" for p in PACKAGE.rglob("*.py")
            if len(p.read_text().splitlines()) > MAX_LINES]
    assert not long, long
