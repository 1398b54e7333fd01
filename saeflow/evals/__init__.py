"""The evaluations (absorption, stitching, meta-SAE, probing): pure code, no Prefect.

Each evaluation is a subpackage holding its config class (``config.py``, composed into the
profile by :mod:`saeflow.config`) and its computations; what they share (the probe trainer,
held-out row selection, SAE info) is in :mod:`saeflow.evals.common`.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any],
                                                                              Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for an evaluation subpackage exporting ``{module: names}``
    (modules relative to ``package``, or absolute when they start with ``saeflow.``); a name is
    imported on first use (PEP 562).

    Lazy because :mod:`saeflow.config` imports each subpackage's light ``config`` module, which runs
    the subpackage's ``__init__`` first; importing the computing modules there (torch, pandas, and
    modules importing :mod:`saeflow.config` back) would make an import circle.
    """
    where = {name: module if module.startswith("saeflow.") else f"{package}.{module}"
             for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__
