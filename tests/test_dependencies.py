"""Every third-party package the code imports (saeflow/, tasks/, flows/; module-level and
function-level imports) is declared in pyproject.toml with a lower bound, and every declared bound
holds for the installed version (the one the suite tests)."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.import_graph import REPO, Import, all_imports, is_project

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def declared() -> dict[str, Requirement]:
    """pyproject's ``[project] dependencies``: canonical distribution name -> requirement."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def third_party() -> dict[str, list[Import]]:
    """Top-level import name -> the statements importing it (stdlib and the project left out)."""
    out: dict[str, list[Import]] = {}
    for imp in all_imports():
        top = imp.target.split(".")[0]
        if top and top not in sys.stdlib_module_names and not is_project(top):
            out.setdefault(top, []).append(imp)
    return out


def _distributions(top: str) -> list[str]:
    return sorted({canonicalize_name(d) for d in metadata.packages_distributions().get(top, [])})


def test_every_imported_package_is_declared_with_a_lower_bound():
    deps = declared()
    problems = []
    for top, where in sorted(third_party().items()):
        dists = _distributions(top)
        first = where[0]
        if not dists:
            problems.append(f"`import {top}` ({first}): no installed distribution provides it; install and declare it")
            continue
        if not any(d in deps for d in dists):
            problems.append(f"`import {top}` ({first}, {len(where)} place(s)): distribution {' / '.join(dists)} "
                            f"is not declared in pyproject.toml [project] dependencies")
            continue
        req = next(deps[d] for d in dists if d in deps)
        if not any(s.operator in (">=", "==", "~=", ">", "===") for s in req.specifier):
            problems.append(f"`import {top}` ({first}): declared as {req} without a lower bound; add "
                            f">={metadata.version(req.name)} (the tested version)")
    assert not problems, "undeclared third-party imports:\n" + "\n".join(problems)


def test_every_declared_bound_holds_for_the_installed_version():
    problems = []
    for name, req in sorted(declared().items()):
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(Version(installed), prereleases=True):
            problems.append(f"{req}: installed version {installed} does not satisfy it")
    assert not problems, "\n".join(problems)


def test_the_walk_sees_function_level_imports():
    """The optional imports inside functions count too (e.g. ``datasets`` in saeflow/corpus.py)."""
    where = third_party()
    assert any(i.in_function for i in where["datasets"]) and any(not i.in_function for i in where["torch"])
