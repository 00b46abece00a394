"""Measure trio_kv's import graph: rooms, arrows and floors.

A *room* is a top-level module (``trio_kv/cli.py``) or a subpackage (``trio_kv/core/``). An
*arrow* is one room importing another (every import counts, lazy ones inside functions too).
*Floors* is the number of levels of the longest chain of arrows; a cycle is reported, not
measured. ``--files`` measures between files instead of rooms.

    python scripts/import_graph.py            # summary
    python scripts/import_graph.py --json     # rooms, arrows, floors, each room's floor
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

PACKAGE = "trio_kv"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """The trio_kv modules one file imports (absolute or relative, at any depth)."""
    name = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def room_of(module: str, rooms: set[str]) -> str | None:
    parts = module.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in rooms:
            return candidate
        parts.pop()
    return None


def build(root: Path, by_file: bool = False) -> tuple[set[str], set[tuple[str, str]]]:
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    if by_file:
        rooms = set(modules)
    else:
        rooms = set()
        for mod in modules:
            parts = mod.split(".")
            rooms.add(".".join(parts[:2]) if len(parts) > 1 else mod)
    arrows: set[tuple[str, str]] = set()
    for mod, path in modules.items():
        src = room_of(mod, rooms)
        for target in imported_modules(path, root):
            if by_file and target not in modules:
                continue  # "from pkg import name": the name, not a module
            dst = room_of(target, rooms)
            if dst is not None and src is not None and dst != src:
                if dst == PACKAGE and not by_file:
                    continue  # the package's own __init__ re-exports; not a layer
                arrows.add((src, dst))
    return rooms, arrows


def floors(rooms: set[str], arrows: set[tuple[str, str]]) -> tuple[dict[str, int], list[str]]:
    """Each room's floor (1 = imports nothing inside trio_kv); and a cycle, if there is one."""
    out: dict[str, list[str]] = {r: [] for r in rooms}
    for a, b in arrows:
        out[a].append(b)
    floor: dict[str, int] = {}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycle: list[str] = []

    def visit(r: str) -> int:
        nonlocal cycle
        if state.get(r) == 2:
            return floor[r]
        if state.get(r) == 1:
            if not cycle:
                cycle = [*stack[stack.index(r) :], r]
            return 0
        state[r] = 1
        stack.append(r)
        level = 1 + max((visit(d) for d in out[r]), default=0)
        stack.pop()
        state[r] = 2
        floor[r] = level
        return level

    for r in sorted(rooms):
        visit(r)
    return floor, cycle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--files", action="store_true", help="measure between files, not rooms")
    parser.add_argument("--json", action="store_true", help="print the measure as JSON")
    args = parser.parse_args(argv)
    rooms, arrows = build(args.root, by_file=args.files)
    floor, cycle = floors(rooms, arrows)
    summary = {
        "rooms": len(rooms),
        "arrows": len(arrows),
        "floors": max(floor.values(), default=0),
        "cycle": cycle,
        "floor_of": dict(sorted(floor.items(), key=lambda kv: (kv[1], kv[0]))),
        "arrow_list": sorted(f"{a} -> {b}" for a, b in arrows),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['rooms']} rooms, {summary['arrows']} arrows, {summary['floors']} floors")
        if cycle:
            print("cycle: " + " -> ".join(cycle))
        for r, f in summary["floor_of"].items():
            print(f"  {f:2d}  {r}")
    return 1 if cycle else 0


if __name__ == "__main__":
    sys.exit(main())
