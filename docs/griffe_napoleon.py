"""A griffe extension: read the package's docstrings as Sphinx' Napoleon reads them.

The package writes Google-style docstrings with two habits of the Sphinx world that griffe's
Google parser does not read:

* ``Example:`` (singular) above ``>>>`` lines, as TransformerLens does. griffe knows only
  ``Examples:`` and would render the singular as an admonition of Markdown, where ``>>>``
  becomes nested quotes and ``x[:2]`` a broken cross-reference.
* Sphinx roles (``:func:`~sae_match_lens.matching.match```, ``:class:`Links```, ...), which
  would show as literal text. Each becomes a cross-reference to the object it names, resolved
  the way Python resolves the name in the docstring's own scope (its module's definitions and
  imports). A role naming a package object that has no page (an undocumented constant, a typo,
  a name not in scope) stays a cross-reference, so the strict build fails on it. A role naming
  another library's object (``torch.Tensor``, ``HookedTransformer`` imported from
  TransformerLens) or a private name becomes code: the site documents neither.

The rewrite happens once the package is loaded; the source stays as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

PACKAGE = "sae_match_lens"
_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|data|attr|mod|exc|obj|const):`(?P<body>[^`]+)`")
_EXPLICIT = re.compile(r"^(?P<text>.+?)\s*<(?P<target>[^<>]+)>$")


def normalise_example_sections(text: str) -> str:
    """``Example:`` section headers renamed to ``Examples:``; nothing else changes.

    Args:
        text: a docstring.

    Returns:
        The docstring with every line that is exactly ``Example:`` (indented or not) renamed.
    """
    return _EXAMPLE_HEADER.sub(r"\1Examples:", text)


def _is_private(path: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


def role_to_markdown(body: str, resolve: Any) -> str:
    """One Sphinx role's body as Markdown: a cross-reference, or code (see the module docstring).

    Args:
        body: the text between the backticks (``~pkg.mod.name``, ``name``, ``text <target>``).
        resolve: ``name -> full path`` in the docstring's scope; raises ``griffe.NameResolutionError``
            for a name it does not know.

    Returns:
        ``[`text`][full.path]``, or ``` `text` ``` for another library's or a private object.
    """
    body = body.strip()
    explicit = _EXPLICIT.match(body)
    target = (explicit.group("target") if explicit else body).strip().removeprefix("~").lstrip(".")
    if explicit:
        text = explicit.group("text")
    else:
        text = target.rsplit(".", 1)[-1] if body.startswith("~") else target
    code = f"`{text}`"
    if target == PACKAGE or target.startswith(f"{PACKAGE}."):
        path = target
    else:
        head, _, rest = target.partition(".")
        try:
            path = resolve(head) + (f".{rest}" if rest else "")
        except griffe.NameResolutionError:
            # A dotted name whose head is not in scope is another library's (numpy.ndarray);
            # a bare unknown name stays a link, and the strict build reports it.
            return code if rest else f"[{code}][{target}]"
    if not (path == PACKAGE or path.startswith(f"{PACKAGE}.")) or _is_private(path):
        return code
    return f"[{code}][{path}]"


def rewrite_docstring(text: str, resolve: Any) -> str:
    """A docstring with ``Example:`` renamed and every Sphinx role rewritten.

    Args:
        text: the docstring.
        resolve: see :func:`role_to_markdown`.

    Returns:
        The rewritten docstring.
    """
    text = normalise_example_sections(text)
    return _ROLE.sub(lambda m: role_to_markdown(m.group("body"), resolve), text)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


class Napoleon(griffe.Extension):
    """Rewrite the docstrings of the package once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite every docstring of the package, before any is parsed.

        Args:
            pkg: the package griffe has just loaded.
            **kwargs: the other arguments of the event (unused).
        """
        if pkg.name != PACKAGE:
            return
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite_docstring(obj.docstring.value, obj.resolve)
