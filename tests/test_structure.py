"""The shape of the house (issue #13): the three layers ``saeflow/`` (pure library, no Prefect) <-
``tasks/`` (Prefect tasks) <- ``flows/`` (wiring) import in one direction only, no module takes
part in an import circle, each module imports on its own, none grows past :data:`MAX_LINES`, and
no flow imports the command line (the CLI imports the flows).

The import graph is read statically (tests/import_graph.py: module-level and function-level
imports), so a circle closed by a lazy import inside a function counts too.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.import_graph import REPO, Import, all_imports, graph, project_modules, project_target

MAX_LINES = 600
#: Layer of each top-level package; a module may import its own layer and those below it.
LAYERS = {"saeflow": 0, "tasks": 1, "flows": 2}


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _one_circle(edges: dict[str, dict[str, Import]], comp: list[str]) -> list[Import]:
    """One concrete circle inside a strongly connected component: the import statements closing it."""
    members = set(comp)
    start = comp[0]
    paths: dict[str, list[Import]] = {start: []}
    todo = [start]
    while todo:  # breadth first from start, back to start
        v = todo.pop(0)
        for w, imp in sorted(edges[v].items()):
            if w == start:
                return paths[v] + [imp]
            if w in members and w not in paths:
                paths[w] = paths[v] + [imp]
                todo.append(w)
    return []


def test_no_import_circle():
    edges = graph()
    found = _cycles(edges)
    report = []
    for comp in found:
        circle = _one_circle(edges, comp)
        report.append(f"import circle between {', '.join(comp)} (rule: no import circles, issue #13):\n"
                      + "\n".join(f"    {imp}" for imp in circle))
    assert not found, "\n".join(report)


def test_layers_import_downwards_only_and_saeflow_never_imports_prefect():
    problems = []
    for imp in all_imports():
        own = imp.importer.split(".")[0]
        top = imp.target.split(".")[0]
        if own == "saeflow" and top in ("prefect", "prefect_dask"):
            problems.append(f"{imp} (rule: saeflow/ is the pure library and never imports Prefect)")
        elif top in LAYERS and LAYERS[top] > LAYERS[own]:
            problems.append(f"{imp} (rule: layers import downwards only: saeflow <- tasks <- flows)")
    assert not problems, "\n".join(problems)


def test_no_flows_module_imports_the_cli():
    problems = [f"{imp} (rule: flows modules never import flows.cli; the CLI imports them)"
                for imp in all_imports()
                if imp.importer.startswith("flows.") and imp.importer != "flows.cli"
                and project_target(imp.target) == "flows.cli"]
    assert not problems, "\n".join(problems)


def test_no_module_over_the_line_limit():
    too_long = []
    for module, path in sorted(project_modules().items()):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            too_long.append(f"{module} ({path.relative_to(REPO)}): {n} lines (rule: at most {MAX_LINES} lines a module)")
    assert not too_long, "\n".join(too_long)


_IMPORT_EACH = r"""
import importlib, json, sys, traceback
project = tuple(sys.argv[1].split(","))
failures = {}
for name in sys.argv[2:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in project]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-4)
print("RESULT " + json.dumps(failures))
"""


def test_each_module_imports_on_its_own():
    """Each module imported first, with none of the project's modules loaded before it (one fresh
    interpreter; the project's modules are dropped from ``sys.modules`` before each import, the
    third-party ones stay loaded to keep it fast). Catches circles and import-order bugs that a
    suite importing modules in its own order hides."""
    modules = sorted(project_modules())
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, "saeflow,tasks,flows", *modules], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    failures = json.loads(line[len("RESULT "):])
    assert not failures, "\n".join(f"{m} does not import on its own (rule: every module imports alone):\n{tb}"
                                   for m, tb in failures.items())
