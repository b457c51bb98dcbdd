"""Layering a tool checks: each package imports only from layers below it; siblings stay independent.

cli -> ui -> api -> recipes -> {training | eval | report | export | serve} -> {methods | rag} -> models -> data -> core
(`strop/api.py`, the public Python API, is a module with a layer of its own.)
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "strop"
RANK = {
    "core": 0,
    "data": 1,
    "models": 2,
    "methods": 3,
    "rag": 3,  # documents -> chunks -> index -> hits; the comparison of arms is a recipe (rag_compare)
    "training": 4,
    "eval": 4,
    "report": 4,
    "export": 4,
    "serve": 4,
    "recipes": 5,
    "tune": 6,  # runs recipes' runs as child processes; reads report and eval
    "api": 7,
    "ui": 8,  # the dashboard: starts runs as child processes, tries runs through the api and serve
    "cli": 9,
}
MODULES = {"api"}  # top-level modules with a layer (strop/__init__.py and __main__.py are facades)


def _strop_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n.split(".")[1] for n in names if n.startswith("strop.") and len(n.split(".")) > 1}


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages | MODULES == set(RANK), f"give new packages a layer in RANK: {packages ^ set(RANK)}"


def test_imports_only_go_down():
    violations = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if len(rel.parts) < 2 and rel.stem not in MODULES:
            continue  # strop/__init__.py and __main__.py are facades
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for target in _strop_imports(path):
            if target == layer:
                continue
            if target not in RANK:
                violations.append(f"{rel}: imports unknown package strop.{target}")
            elif RANK[target] >= RANK[layer]:
                violations.append(
                    f"{rel}: {layer} (layer {RANK[layer]}) imports {target} (layer {RANK[target]})"
                )
    assert not violations, "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from strop.cli.main import main\nimport strop.recipes.sft\n")
    assert _strop_imports(bad) == {"cli", "recipes"}
