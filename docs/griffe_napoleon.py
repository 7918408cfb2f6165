"""A griffe extension: read the package's docstrings as Sphinx' Napoleon reads them.

The package writes Google-style docstrings with two habits of the Sphinx world that griffe's
Google parser does not read:

* ``Example:`` (singular) above ``>>>`` lines, as TransformerLens does. griffe knows only
  ``Examples:`` and would render the singular as an admonition of Markdown, where ``>>>``
  becomes nested quotes and ``x[:2]`` a broken cross-reference.
* Sphinx roles (``:func:`~sae_match_lens.matching.match```, ``:class:`Links```, ...), which
  would show as literal text. Each becomes a cross-reference to the object it names, resolved
  the way Python resolves the name in the docstring's own scope (its module's definitions and
  imports) and followed through re-exports to where the object is defined (a deprecated module
  that re-exports a moved name still leads to its page). A role naming a package object that
  has no page (an undocumented constant, a typo, a name not in scope) stays a
  cross-reference, so the strict build fails on it. A role naming
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


def role_to_markdown(body: str, resolve: Any, canonical: Any = None, package: str = PACKAGE) -> str:
    """One Sphinx role's body as Markdown: a cross-reference, or code (see the module docstring).

    Args:
        body: the text between the backticks (``~pkg.mod.name``, ``name``, ``text <target>``).
        resolve: ``name -> full path`` in the docstring's scope; raises ``griffe.NameResolutionError``
            for a name it does not know.
        canonical: ``full path -> the path of the object's definition`` (a re-export, e.g. a
            deprecated module's, leads to where the object is documented); ``None``: as is.
        package: the documented package.

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
    if target == package or target.startswith(f"{package}."):
        path = target
    else:
        head, _, rest = target.partition(".")
        try:
            path = resolve(head) + (f".{rest}" if rest else "")
        except griffe.NameResolutionError:
            # A dotted name whose head is not in scope is another library's (numpy.ndarray);
            # a bare unknown name stays a link, and the strict build reports it.
            return code if rest else f"[{code}][{target}]"
    if canonical is not None and (path == package or path.startswith(f"{package}.")):
        path = canonical(path)
    if not (path == package or path.startswith(f"{package}.")) or _is_private(path):
        return code
    return f"[{code}][{path}]"


def rewrite_docstring(text: str, resolve: Any, canonical: Any = None, package: str = PACKAGE) -> str:
    """A docstring with ``Example:`` renamed and every Sphinx role rewritten.

    Args:
        text: the docstring.
        resolve: see :func:`role_to_markdown`.
        canonical: see :func:`role_to_markdown`.
        package: the documented package.

    Returns:
        The rewritten docstring.
    """
    text = normalise_example_sections(text)
    return _ROLE.sub(lambda m: role_to_markdown(m.group("body"), resolve, canonical, package), text)


def canonical_path(pkg: griffe.Object, path: str) -> str:
    """The path where the object at ``path`` is defined, following re-exports.

    Args:
        pkg: the loaded package.
        path: a dotted path inside it.

    Returns:
        The definition's path, or ``path`` unchanged when it names nothing griffe can follow
        (the strict build then reports the link).
    """
    try:
        obj = pkg if path == pkg.path else pkg[path.removeprefix(f"{pkg.path}.")]
        return obj.final_target.path if obj.is_alias else obj.path
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


class Napoleon(griffe.Extension):
    """Rewrite the docstrings of the package once it is loaded (see the module docstring).

    Args:
        package: the package whose docstrings are rewritten.
    """

    def __init__(self, package: str = PACKAGE) -> None:
        super().__init__()
        self.package = package

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite every docstring of the package, before any is parsed.

        Args:
            pkg: the package griffe has just loaded.
            **kwargs: the other arguments of the event (unused).
        """
        if pkg.name != self.package:
            return
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite_docstring(
                    obj.docstring.value, obj.resolve, lambda path: canonical_path(pkg, path), self.package)
