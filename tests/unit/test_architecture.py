"""The rules that keep each rule in one place, checked on the source of pipeline/ (docs/architecture.md).

- the run layout is spelled only in rundir.py: the literal ``"checkpoints"`` appears once;
- files are published only by storage.py: no ``os.replace``/``os.rename``/``shutil.move``/``.rename()``
  anywhere else;
- small units: no function over 60 lines (the argument parser is a table, and exempt);
- no import cycle, between modules (imports inside functions count) or between the top-level units
  (each pipeline/X.py, and each subpackage as a whole).

These read the source with `ast`; nothing of the package is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
MAX_FUNCTION_LINES = 60
LONG_ALLOWED = {("cli.py", "build_parser")}  # the subcommand table: long, but flat


def sources(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` by dotted name (a package by its own name, for its __init__)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def rel(path: Path, package: Path = PACKAGE) -> str:
    return path.relative_to(package).as_posix()


# ---------------------------------------------------------------- layout spelled in one place

def docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (prose may say "checkpoints")."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


LAYOUT_LITERAL = re.compile(r"^/?checkpoints(/|$)")  # "checkpoints", "checkpoints/step_…", "/checkpoints"


def layout_literals(package: Path = PACKAGE) -> list[str]:
    hits = []
    for path in sources(package).values():
        tree = parse(path)
        skip = docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                    and LAYOUT_LITERAL.match(node.value)):
                hits.append((rel(path, package), node.lineno, repr(node.value)))
    return [f"{file}:{line}: {what}" for file, line, what in sorted(hits)]


def test_the_checkpoints_folder_is_named_only_in_rundir():
    hits = layout_literals()
    assert len(hits) == 1 and hits[0].startswith("rundir.py:"), (
        "the run layout belongs to pipeline/rundir.py (use RunDir(...).checkpoints); found:\n  " + "\n  ".join(hits))


# ---------------------------------------------------------------- files published in one place

def publishing_calls(package: Path = PACKAGE) -> list[str]:
    """Calls that move a file into place: ``os.replace``/``os.rename``, ``shutil.move``, any
    ``X.rename(...)`` (Path.rename), and the same names imported bare from os/shutil."""
    hits = []
    for path in sources(package).values():
        for node in ast.walk(parse(path)):
            what = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                attr, owner = node.func.attr, node.func.value
                owner_name = owner.id if isinstance(owner, ast.Name) else None
                if attr in ("replace", "rename") and owner_name == "os":
                    what = f"os.{attr}"
                elif attr == "move" and owner_name == "shutil":
                    what = "shutil.move"
                elif attr == "rename":
                    what = ".rename()"
            elif isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil"):
                bare = {a.name for a in node.names} & {"replace", "rename", "renames", "move"}
                what = f"from {node.module} import {', '.join(sorted(bare))}" if bare else None
            if what:
                hits.append((rel(path, package), node.lineno, what))
    return [f"{file}:{line}: {what}" for file, line, what in sorted(hits)]


def test_files_are_moved_into_place_only_by_the_storage_layer():
    hits = [h for h in publishing_calls() if not h.startswith("storage.py:")]
    assert not hits, ("write through open_storage(...).write_atomic / open_atomic / move / publish "
                      "(pipeline/storage.py) instead of:\n  " + "\n  ".join(hits))


# ---------------------------------------------------------------- small units

def long_functions(package: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, str, int]]:
    """(file, qualified name, lines from ``def`` to the last line) of every function over ``limit``."""
    out = []

    def visit(node: ast.AST, prefix: str, file: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > limit:
                        out.append((file, name, lines))
                visit(child, f"{name}.", file)
            else:
                visit(child, prefix, file)

    for path in sources(package).values():
        visit(parse(path), "", rel(path, package))
    return sorted(out)


def test_no_function_is_over_60_lines_but_the_argument_parser():
    long = [f"{file}:{name} ({n} lines)" for file, name, n in long_functions() if (file, name) not in LONG_ALLOWED]
    assert not long, f"split these into functions of at most {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(long)


# ---------------------------------------------------------------- no import cycles

def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, str]]:
    """module → {module it imports: "file:line" of the first such import}, over every import in the
    file (at the top, inside functions, under ``if``). ``from pipeline.x import y`` points at
    ``pipeline.x.y`` when that is a module, else at ``pipeline.x``; the package root itself
    (``from pipeline import __version__``) is not an edge."""
    modules = sources(package)
    root = package.name
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(parse(path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target not in (module, root):
                    graph[module].setdefault(target, f"{rel(path, package)}:{node.lineno}")
    return graph


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module an ``from … import`` names, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def unit_of(module: str) -> str:
    """``pipeline.train.state`` → ``pipeline.train``; ``pipeline.cli`` → ``pipeline.cli``."""
    return ".".join(module.split(".")[:2])


def unit_graph(graph: dict[str, dict[str, str]], package: Path = PACKAGE) -> dict[str, dict[str, str]]:
    """The import graph with each subpackage collapsed into one node (top-level files stay nodes)."""
    units: dict[str, dict[str, str]] = {}
    for module, targets in graph.items():
        a = unit_of(module)
        units.setdefault(a, {})
        for target, where in targets.items():
            b = unit_of(target)
            if a != b and b != package.name:
                units[a].setdefault(b, where)
    return units


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def a_loop(graph: dict[str, dict[str, str]], component: list[str]) -> str:
    """One closed path through ``component``, each edge with the import that makes it."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to ``start``
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, {})):
                if w == start:
                    path = paths[v] + [start]
                    return " → ".join(f"{a} ({graph[a][b]})" for a, b in zip(path, path[1:])) + f" → {start}"
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return " ↔ ".join(component)


def describe_cycles(graph: dict[str, dict[str, str]]) -> str:
    return "\n  ".join(a_loop(graph, c) for c in cycles(graph))


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert not cycles(graph), "import cycles (move the shared part down a layer):\n  " + describe_cycles(graph)


def test_no_import_cycle_between_top_level_units():
    units = unit_graph(import_graph())
    assert not cycles(units), ("import cycles between top-level units (pipeline/X.py, pipeline/SUBPACKAGE/):\n  "
                               + describe_cycles(units))


# ---------------------------------------------------------------- the checks themselves

def test_the_checks_see_what_they_look_for(tmp_path):
    """On a small made-up package, every check finds its planted offence (so a pass is not vacuous)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0'\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text('"""Where checkpoints go."""\nimport os\nfrom pkg import __version__\n'
                              'def f():\n    from pkg.sub import b\n    os.replace("x", "y")\n'
                              '    return "checkpoints"\n')
    (pkg / "sub" / "b.py").write_text("from pkg.a import f\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("import pathlib\npathlib.Path('x').rename('y')\n"
                                      "def long():\n" + "    pass\n" * 60)
    assert layout_literals(pkg) == ["a.py:7: 'checkpoints'"]
    assert publishing_calls(pkg) == ["a.py:6: os.replace", "sub/c.py:2: .rename()"]
    assert long_functions(pkg) == [("sub/c.py", "long", 61)]
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b": "a.py:5"} and graph["pkg.sub.b"] == {"pkg.a": "sub/b.py:1",
                                                                                  "pkg.sub.c": "sub/b.py:2"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert cycles(unit_graph(graph, pkg)) == [["pkg.a", "pkg.sub"]]
    assert "pkg.a (a.py:5) → pkg.sub.b (sub/b.py:1) → pkg.a" in describe_cycles(graph)
