"""A griffe extension: read the package's ``Example:`` sections as Google-style examples.

The package writes ``Example:`` (singular) above ``>>>`` lines, as TransformerLens does and as
Sphinx' Napoleon reads it. griffe's Google parser knows only ``Examples:``, and would render
the singular as an admonition of Markdown, where ``>>>`` becomes nested quotes and ``x[:2]``
a broken cross-reference. This extension renames the section header on load; the source
stays as it is.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


def normalise_example_sections(text: str) -> str:
    """``Example:`` section headers renamed to ``Examples:``; nothing else changes.

    Args:
        text: a docstring.

    Returns:
        The docstring with every line that is exactly ``Example:`` (indented or not) renamed.
    """
    return _EXAMPLE_HEADER.sub(r"\1Examples:", text)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` to ``Examples:`` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the object's docstring before it is parsed.

        Args:
            obj: the object griffe has just created.
            **kwargs: the other arguments of the event (unused).
        """
        if obj.docstring is not None:
            obj.docstring.value = normalise_example_sections(obj.docstring.value)
