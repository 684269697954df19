"""The templates of every document the product writes (cards, audits, evaluations, reports), and how they are rendered.

Values come from storage, manifests and cards and are never trusted: HTML templates autoescape
them; Markdown templates turn the characters that would start a tag, a table cell, a link or code
into character references, so a level named ``a|b`` or ``<script>`` stays text. Templates format
numbers with ``number`` and reach into nested card fields with ``dig``, so a field of the wrong
type (a damaged or hostile card) shows as text instead of ending the render.
"""

from __future__ import annotations

import re
from typing import Any

import jinja2

__all__ = ["render"]

# Character references rather than backslashes: the result holds none of these characters, so
# escaping twice (a macro's output passes through finalize again) changes nothing, and no run of
# backslashes in a value can turn an escape off again. Line breaks would end a table row or a quote.
_MARKDOWN_SPECIAL = re.compile(r"[`\[\]<>|\r\n]")
_REFERENCES = {"`": "&#96;", "[": "&#91;", "]": "&#93;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "\r": " ",
               "\n": " "}


def _markdown_text(value: Any) -> str:
    return _MARKDOWN_SPECIAL.sub(lambda match: _REFERENCES[match.group()], "" if value is None else str(value))


def _number(value: Any, fmt: str = "%s") -> str:
    """A number as ``fmt`` says, None as n/a, anything else as (escaped) text."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt % value
    return str(value)


def _dig(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...``, or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _environment(**options: Any) -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.PackageLoader("templates", "."), trim_blocks=True,
                                     lstrip_blocks=True, **options)
    environment.filters.update(number=_number, mapping=_mapping)
    environment.globals.update(dig=_dig)
    return environment


_HTML = _environment(autoescape=True, undefined=jinja2.StrictUndefined)
_MARKDOWN = _environment(autoescape=False, finalize=_markdown_text)


def render(name: str, **values: Any) -> str:
    """Render ``templates/<name>``: HTML-escaped for ``.html.j2``, Markdown-escaped for ``.md.j2``."""
    environment = _HTML if name.endswith(".html.j2") else _MARKDOWN
    return environment.get_template(name).render(**values)
