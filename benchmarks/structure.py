"""Structure figures of the production code, read from the code itself (issue 23's before/after list).

    python benchmarks/structure.py [--json]

Prints: the largest module and class (lines); function-local imports (all, and those that load the
project's own modules); import cycles between project modules (any import that runs, at the top or in
a function; `if TYPE_CHECKING:` imports are for the type checker and do not count); places that build
a path under the state directory; supervisor drivers that run their own feed loop (a ``while`` around
``<supervisor>.handle(...)`` outside agent/core).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "hal", "provisioning", "lab", "firmware")
PROJECT = set(PACKAGES)
# a path joined onto the state directory: `state_dir / "x"`, `Path(config.state_dir) / "x"`
STATE_PATH = re.compile(r"state_dir\)?\s*/")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every production module."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(node: ast.AST, module: str) -> list[str]:
    """The dotted names an import statement loads (relative imports resolved against ``module``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        parent = module.split(".")[: -node.level] if node.level else []
        base = ".".join(parent + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def is_project(name: str) -> bool:
    # firmware modules import each other by bare name (``import mqtt_codec``)
    return name.split(".")[0] in PROJECT or name in {"mqtt_codec", "net", "session", "board_config", "tether_main"}


def function_local_imports(tree: ast.AST) -> list[ast.AST]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    found.append(node)
    return list({id(n): n for n in found}.values())


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def own_feed_loops(tree: ast.AST) -> int:
    """``while`` loops that call ``<x>.handle(...)`` on something named like a supervisor."""
    count = 0
    for loop in ast.walk(tree):
        if isinstance(loop, ast.While):
            for node in ast.walk(loop):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "handle"
                        and "sup" in ast.unparse(node.func.value)):
                    count += 1
                    break
    return count


def measure() -> dict[str, object]:
    mods = modules()
    largest_module = ("", 0)
    largest_class = ("", 0)
    local_all = 0
    local_project = 0
    local_where: dict[str, int] = {}
    state_paths: list[str] = []
    drivers: list[str] = []
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        text = path.read_text()
        tree = ast.parse(text)
        lines = len(text.splitlines())
        if lines > largest_module[1]:
            largest_module = (str(path.relative_to(ROOT)), lines)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > largest_class[1]:
                    largest_class = (f"{path.relative_to(ROOT)}:{node.name}", size)
        locals_ = function_local_imports(tree)
        local_all += len(locals_)
        project = [n for n in locals_ if any(is_project(x) for x in imported_names(n, name))]
        local_project += len(project)
        if project:
            local_where[str(path.relative_to(ROOT))] = len(project)
        state_dir_class = "class StateDir" in text  # agent/state.py names every path under the root
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if STATE_PATH.search(code) or (state_dir_class and re.search(r"self\.root\s*/", code)):
                state_paths.append(f"{path.relative_to(ROOT)}:{i}")
        if not name.startswith("agent.core") and own_feed_loops(tree):
            drivers.append(str(path.relative_to(ROOT)))
        edges = set()
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in typing_only:
                for target in imported_names(node, name):
                    if target in mods and target != name:
                        edges.add(target)
        graph[name] = edges
    found = cycles(graph)
    return {
        "largest_module": {"path": largest_module[0], "lines": largest_module[1]},
        "largest_class": {"name": largest_class[0], "lines": largest_class[1]},
        "modules_over_400_lines": sum(1 for p in mods.values() if len(p.read_text().splitlines()) > 400),
        "function_local_imports": local_all,
        "function_local_imports_of_project_modules": local_project,
        "function_local_project_imports_by_file": dict(sorted(local_where.items())),
        "import_cycles": found,
        "state_path_builders": state_paths,
        "modules_building_state_paths": sorted({p.split(":")[0] for p in state_paths}),
        "supervisor_drivers_with_own_loop": drivers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = measure()
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"largest module: {figures['largest_module']['path']} ({figures['largest_module']['lines']} lines)")
    print(f"largest class: {figures['largest_class']['name']} ({figures['largest_class']['lines']} lines)")
    print(f"modules over 400 lines: {figures['modules_over_400_lines']}")
    print(f"function-local imports: {figures['function_local_imports']} "
          f"({figures['function_local_imports_of_project_modules']} load project modules)")
    print(f"import cycles: {len(figures['import_cycles'])} {figures['import_cycles'] or ''}")
    print(f"places that build a state path: {len(figures['modules_building_state_paths'])} module(s) "
          f"{figures['modules_building_state_paths']}, {len(figures['state_path_builders'])} line(s)")
    print(f"supervisor drivers with their own loop: {len(figures['supervisor_drivers_with_own_loop'])} "
          f"{figures['supervisor_drivers_with_own_loop'] or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
