"""The house in numbers: lines of the forker's kind and of the engine, and the import graph.

    python bench/house.py            # a table, the import rules checked, exit 1 if one is broken

Kinds, by where a file sits: the forker's rooms are trainlab/{models,nets,data} (and conf/);
the engine is trainlab/engine and hydra_plugins; the doors are the entry points at the top of
the package (train, eval, export, predict, compare, wandb_sweep). The rules: no import circles;
the engine imports nothing of the forker's rooms or the doors (it builds them from configs);
the rooms import the engine only through its public surface (`from trainlab.engine import`);
nothing imports a door. tests/test_house.py asserts the same rules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOMS = ("trainlab.models", "trainlab.nets", "trainlab.data")
ENGINE = ("trainlab.engine", "hydra_plugins")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def kind(module: str) -> str:
    if module.startswith(ROOMS):
        return "forker"
    if module.startswith(ENGINE):
        return "engine"
    return "door" if module.count(".") == 1 else "package"


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports (at any depth of its code), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _type_checking_only(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.module
        for stmt in tree.body
        if isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "TYPE_CHECKING"
        for n in stmt.body
        if isinstance(n, ast.ImportFrom)
    }


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for module, path in known.items():
        edges[module] = imports(module, path, known) - _type_checking_only(path)
        # a package's own __init__ is not an edge of its submodules
        edges[module] = {m for m in edges[module] if not module.startswith(m + ".")}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each once (by its smallest member first)."""
    found = set()

    def walk(start: str, here: str, path: list[str]) -> None:
        for nxt in edges.get(here, ()):
            if nxt == start:
                found.add(tuple(path))
            elif nxt not in path and nxt > start:
                walk(start, nxt, [*path, nxt])

    for module in edges:
        walk(module, module, [module])
    return [list(c) for c in sorted(found)]


def broken_rules(edges: dict[str, set[str]]) -> list[str]:
    broken = [f"circle: {' -> '.join([*c, c[0]])}" for c in circles(edges)]
    for module, targets in edges.items():
        for target in targets:
            if kind(target) == "door":
                broken.append(f"{module} imports the door {target}")
            elif kind(module) == "engine" and kind(target) == "forker":
                broken.append(f"the engine's {module} imports the forker's {target}")
            elif (
                kind(module) == "forker"
                and kind(target) == "engine"
                and target != "trainlab.engine"
            ):
                broken.append(f"{module} imports {target}, not the engine's public surface")
    return sorted(broken)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def main() -> int:
    known = modules()
    totals: dict[str, int] = {}
    for module, path in known.items():
        totals[kind(module)] = totals.get(kind(module), 0) + lines(path)
    conf = sum(lines(p) for p in (SRC.parent / "conf").rglob("*.yaml"))
    whole = sum(totals.values())
    for name in ("forker", "engine", "door", "package"):
        share = totals.get(name, 0) / whole
        print(f"{name:8} {totals.get(name, 0):6d} lines  {share:5.1%}")
    print(f"{'conf':8} {conf:6d} lines of YAML (the forker's too)")
    broken = broken_rules(graph())
    for rule in broken:
        print("broken:", rule)
    print("import rules:", "all hold" if not broken else f"{len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
