"""The evaluations (absorption, stitching, meta-SAE, probing): pure code, no Prefect.

Each evaluation is a subpackage holding its config class (``config.py``, composed into the
profile by :mod:`saeflow.config`) and its computations; what they share (the probe trainer,
held-out row selection, SAE info) is in :mod:`saeflow.evals.common`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for an evaluation subpackage whose public names are imported on first use.

    ``exports`` maps a public name to the module defining it (``".forms"`` relative to
    ``package``, or an absolute module name). Lazy because :mod:`saeflow.config` imports each
    subpackage's light ``config`` module, which runs the subpackage's ``__init__`` first; importing
    the computing modules there (torch, the SAE registry, and back to :mod:`saeflow.config`) would
    make an import circle.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
