"""The package's import graph: one way only (no module imports one that imports it back, even inside a
function), and `genie_env` never imports `training`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _imports(package: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = deps
    return graph


def test_genie_env_imports_run_one_way():
    graph = _imports("genie_env")
    internal = {m: {d for d in deps if d in graph and d != "genie_env"} for m, deps in graph.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in internal[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = sorted(m for m in internal if m in reach(m))
    assert not cycles, f"modules importing themselves through others: {cycles}"
    assert not any(d.split(".")[0] == "training" for deps in graph.values() for d in deps)
