"""The base of every config: frozen pydantic models whose hash (minus operational fields) keys the cache.

Kept apart from :mod:`saeflow.config` so the configs that live beside their code (the SAE
configs in :mod:`saeflow.saes`, each evaluation's in :mod:`saeflow.evals`) import this and
:mod:`saeflow.config` imports them, with no import circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Frozen", "operational"]


def operational(default: Any, description: str = "") -> Any:
    """A field that changes how a stage runs, not what it produces: left out of fingerprints."""
    return Field(default, description=description, json_schema_extra={"operational": True})


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def fingerprint_payload(self) -> dict[str, Any]:
        """The config as JSON-able data, without operational fields (recursively)."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("operational"):
                continue
            value = getattr(self, name)
            out[name] = value.fingerprint_payload() if isinstance(value, Frozen) else _jsonable(value)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Frozen):
        return value.fingerprint_payload()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
