"""The SAE architectures by name: ``REGISTRY["topk"]`` is :class:`saeflow.saes.topk.TopKSAE`.

Adding an architecture = one module ``saeflow/saes/<name>.py`` holding a :class:`~saeflow.saes.base.BaseSAE`
subclass with ``architecture = "<name>"``, plus one line in :data:`_ENTRIES` below.

This module imports nothing from saeflow: entries are ``"module:Class"`` strings, imported on first
access, so the config (which checks names against :data:`REGISTRY`) and the architectures (which
import the config) never import each other in a circle. Names alone (``name in REGISTRY``,
``sorted(REGISTRY)``, ``len(REGISTRY)``) import nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["REGISTRY", "K_ARCHITECTURES", "Registry"]

#: name -> ``"module:Class"`` of every architecture (the name is also the class's ``architecture``).
_ENTRIES: dict[str, str] = {
    "topk": "saeflow.saes.topk:TopKSAE",
    "batchtopk": "saeflow.saes.batchtopk:BatchTopKSAE",
    "matryoshka": "saeflow.saes.matryoshka:MatryoshkaSAE",
    "relu": "saeflow.saes.relu:StandardSAE",
    "jumprelu": "saeflow.saes.jumprelu:JumpReLUSAE",
}

#: Architectures whose sparsity is set by ``k`` (the ``k <= width`` check, the ``k`` column of the
#: tables and the ``ks`` grid of a family apply to these only). The project's one definition of the set.
K_ARCHITECTURES: frozenset[str] = frozenset({"topk", "batchtopk", "matryoshka"})


class Registry(Mapping[str, Any]):
    """Read-only mapping name -> SAE class, each class imported when first looked up."""

    def __init__(self, entries: Mapping[str, str]) -> None:
        self._entries = dict(entries)
        self._classes: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        cls = self._classes.get(name)
        if cls is None:
            module_name, _, attr = self._entries[name].partition(":")  # KeyError for unknown names
            cls = getattr(importlib.import_module(module_name), attr)
            if getattr(cls, "architecture", None) != name:
                raise TypeError(f"{self._entries[name]} declares architecture={getattr(cls, 'architecture', None)!r}, "
                                f"but the registry lists it as {name!r}")
            self._classes[name] = cls
        return cls

    def __contains__(self, name: object) -> bool:  # names only: no import
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self._entries!r})"


REGISTRY = Registry(_ENTRIES)
