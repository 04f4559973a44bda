"""The Jinja2 environment of the HTML pages (the run report, the comparison).

Templates are ``templates/*.html`` in this package, autoescaped: every value
is text unless a template says otherwise, so names from the user's data
(class names, paths, labels) cannot inject markup.  Figures are embedded as
``data:`` URIs, so each page is one self-contained file.
"""

from __future__ import annotations

import base64
import functools
import re

import jinja2
import markupsafe

from visiontune.pipeline import formatting


def code_spans(text) -> markupsafe.Markup:
    """Text with its ```code``` spans as ``<code>`` elements (the rest escaped)."""
    return markupsafe.Markup(re.sub(r"`([^`]*)`", r"<code>\1</code>", str(markupsafe.escape(text))))


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("visiontune.pipeline", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(
        num=formatting.num,  # {{ v | num }}, {{ v | num(3) }}
        fmt=formatting.fmt,  # {{ v | fmt("{:.1f} s") }}
        thousands=formatting.thousands,
        size=formatting.size,
        b64=lambda data: base64.b64encode(data).decode("ascii"),
        code_spans=code_spans,
    )
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)
