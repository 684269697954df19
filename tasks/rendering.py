"""The jinja2 environments for everything rendered from ``tasks/templates``.

Values come from storage, manifests and cards and are never trusted: HTML templates autoescape
them; Markdown templates escape the characters that would start a table cell, a tag, a link or
code, so a level named ``a|b`` or ``<script>`` stays text.
"""

from __future__ import annotations

import re

import jinja2

__all__ = ["render"]

# Idempotent (an already escaped character is left alone): macros' output passes through twice.
_MARKDOWN_SPECIAL = re.compile(r"(?<!\\)([`\[\]<>|])")


def _markdown_text(value) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", "" if value is None else str(value))


_LOADER = jinja2.PackageLoader("tasks", "templates")
_HTML = jinja2.Environment(loader=_LOADER, autoescape=True, undefined=jinja2.StrictUndefined,
                           trim_blocks=True, lstrip_blocks=True)
_MARKDOWN = jinja2.Environment(loader=_LOADER, autoescape=False, finalize=_markdown_text,
                               trim_blocks=True, lstrip_blocks=True)


def render(name: str, **values) -> str:
    """Render ``tasks/templates/<name>``: HTML-escaped for ``.html.j2``, Markdown-escaped for ``.md.j2``."""
    environment = _HTML if name.endswith(".html.j2") else _MARKDOWN
    return environment.get_template(name).render(**values)
