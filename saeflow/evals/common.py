"""What the evaluations share."""

from __future__ import annotations
