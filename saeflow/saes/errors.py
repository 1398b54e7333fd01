"""Errors of the SAE layer, in a module of their own so that :mod:`saeflow.saes.base` (which raises
them) and :mod:`saeflow.saes.saelens_format` (which raises them and builds :class:`BaseSAE` objects)
import in one direction only: ``errors`` <- ``base`` <- ``saelens_format``."""

from __future__ import annotations

from saeflow.artifacts import ArtifactError

__all__ = ["SAEFormatError"]


class SAEFormatError(ArtifactError):
    """An SAE folder that is missing, unreadable, corrupt or of the wrong shape."""
