"""The house's floors (README "Layout"): every import of src/fruitpipe, those inside functions too, goes to the same
area or a lower one, so the capabilities (classify, serve, drift, cloud) stay siblings over the shared floors and
no import runs back up. A new module must be given its area here; an arrow back up fails with its file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import fruitpipe

SRC = Path(fruitpipe.__file__).parent

#: Areas from the ground up: a module may import its own area and the ones below. Within an area, no cycles.
FLOORS: list[tuple[str, ...]] = [
    ("errors", "jsonio", "vectors", "schemas", "images", "augment", "version", "storage_options", "plots", "logs",
     "layout", "s3_objects", "options"),
    ("storage", "download"),
    ("models", "lease", "commits", "sample"),
    ("output", "config"),
    ("report", "monitor"),
    ("spark", "cli_args"),
    ("pipeline", "run_args"),
    ("__init__", "classify"),
    ("drift", "cloud", "serve"),
    ("cli_apps", "cli_emr"),
    ("cli_layers",),
    ("cli",),
    ("cli_reference",),
]


def _area(module: str) -> str:
    """fruitpipe.classify.train -> classify; fruitpipe -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported fruitpipe module, line) for every import statement of the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    node.module.split(".")[0] == "fruitpipe":
                targets = [node.module] if node.module != "fruitpipe" else [f"fruitpipe.{a.name}" for a in node.names]
                found += [(module, t, node.lineno) for t in targets]
            elif isinstance(node, ast.Import):
                found += [(module, a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "fruitpipe"]
    return found


def test_every_area_has_its_floor() -> None:
    known = {a for floor in FLOORS for a in floor}
    areas = {_area(".".join(p.relative_to(SRC.parent).with_suffix("").parts)) for p in SRC.rglob("*.py")}
    assert areas - known == set(), "give these modules their floor in FLOORS"


def test_no_import_runs_back_up() -> None:
    floor = {a: i for i, names in enumerate(FLOORS) for a in names}
    up = [f"{m} -> {t} (line {line})" for m, t, line in _imports()
          if floor.get(_area(t), -1) > floor.get(_area(m), -1)]
    assert up == []


def test_no_circles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for m, t, _ in _imports():
        if t != m and not m.startswith(t + "."):  # a module reading its own package's face is not a circle
            graph.setdefault(m, set()).add(t)
    seen: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in seen and (loop := visit(nxt, [*path, node])):
                return loop
        seen[node] = 2
        return None

    for start in sorted(graph):
        if start not in seen:
            assert visit(start, []) is None
