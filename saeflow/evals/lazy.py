"""Lazy re-exports for the evaluation subpackages.

:mod:`saeflow.config` imports each evaluation's ``config.py``, and importing a submodule runs its
package's ``__init__`` first: an ``__init__`` importing the evaluation's code would make loading a
profile import torch, pandas and modules that import :mod:`saeflow.config` back (a circle). So an
evaluation's ``__init__`` names its public API and the module holding each name, and a name is
imported on first use (PEP 562): ``from saeflow.evals import absorption as ab; ab.evaluate_sae``.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any],
                                                                              Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` exporting ``{module: names}`` (modules
    relative to the package)."""
    where = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__
