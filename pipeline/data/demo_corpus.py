"""The embedded demo corpus: docstrings of the Python standard library that runs this code.

Real English technical prose that nobody on this project wrote, present on every machine with
Python, so `pretrain demo` needs no download. Reading is deterministic for a given Python version
(sorted files, ast parsing — no module is imported).
"""

from __future__ import annotations

import ast
import inspect
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}


def stdlib_docstrings(min_chars: int = 120) -> Iterator[tuple[str, str]]:
    """Yield (qualified name, cleaned docstring) for modules, classes and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                name = module if node is tree else f"{module}.{node.name}"
                yield name, inspect.cleandoc(doc)


def write_demo_corpus(path: str | Path, max_bytes: int = 4_000_000) -> int:
    """Write the corpus as jsonl ({"id", "text"}); returns the number of documents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for name, text in stdlib_docstrings():
            line = json.dumps({"id": name, "text": text}) + "\n"
            f.write(line)
            n += 1
            size += len(line)
            if size >= max_bytes:
                break
    return n
