"""The static imports of the project's code (saeflow/, tasks/, flows/), read from the source (AST):
module-level and function-level ``import`` / ``from ... import`` statements, relative ones
resolved; those under ``if TYPE_CHECKING:`` are left out (they never run).

Used by tests/test_structure.py (the import graph: cycles, layering) and tests/test_dependencies.py
(the third-party packages the code imports).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The project's code, each a top-level package (tests/ and benchmarks/ are not part of it here).
PACKAGES = ("saeflow", "tasks", "flows")


@dataclass(frozen=True)
class Import:
    importer: str
    """The module holding the statement (``flows.pipeline``)."""
    target: str
    """The absolute name imported: ``saeflow.config`` for ``from saeflow.config import X``,
    ``saeflow.remote`` for ``from saeflow import remote`` (a module), ``torch`` for ``import torch``."""
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "inside a function" if self.in_function else "at module level"
        return f"{self.importer} (line {self.line}, {where}) imports {self.target}"


@lru_cache(maxsize=None)
def project_modules() -> dict[str, Path]:
    """Module name -> file of every module under :data:`PACKAGES` (a package is its ``__init__``)."""
    out: dict[str, Path] = {}
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _is_package(module: str) -> bool:
    return project_modules()[module].name == "__init__.py"


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.Module):
    """Every import statement that can run, with whether it sits inside a function."""
    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    yield from walk(other, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.Lambda)))
    yield from walk(tree, False)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@lru_cache(maxsize=None)
def imports_of(module: str) -> tuple[Import, ...]:
    path = project_modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    known = project_modules()
    out: list[Import] = []
    for node, in_function in _statements(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, alias.name, node.lineno, in_function) for alias in node.names]
            continue
        base = _absolute(module, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append(Import(module, sub if sub in known else base, node.lineno, in_function))
    return tuple(out)


def all_imports() -> list[Import]:
    return [imp for module in project_modules() for imp in imports_of(module)]


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def project_target(name: str) -> str | None:
    """The project module an import of ``name`` runs (the longest known prefix), or ``None``."""
    if not is_project(name):
        return None
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in project_modules():
            return candidate
    return None


def graph() -> dict[str, dict[str, Import]]:
    """Importer -> {imported project module: the first statement importing it}."""
    out: dict[str, dict[str, Import]] = {m: {} for m in project_modules()}
    for imp in all_imports():
        target = project_target(imp.target)
        if target is not None and target != imp.importer:
            out[imp.importer].setdefault(target, imp)
    return out
