"""Pages (markdown, HTML) rendered from the Jinja2 templates in ``saeflow/templates/``.

Compute the page's data first, then :func:`render` it: the one Jinja2 environment of the project
(report, meta-SAE examples). Autoescaping is on for every template, so text that comes from data
(decoded tokens, labels) cannot inject markup; a template whose output must not be escaped (the
report's markdown twin) says so itself with an ``{% autoescape false %}`` block.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).parent / "templates"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(name: str, **context: Any) -> str:
    """The template ``saeflow/templates/<name>`` rendered with ``context``."""
    return _environment().get_template(name).render(**context)


def template_version(name: str) -> str:
    """``"template=<hash>"`` of a template's text: an upstream token for a page's fingerprint, so an
    edited template gives the page a new artifact (as :func:`tasks.common.code_version` does for code)."""
    return "template=" + hashlib.sha256((TEMPLATES / name).read_bytes()).hexdigest()[:12]
