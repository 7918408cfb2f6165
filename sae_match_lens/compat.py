"""Old import paths of 0.2 that keep working in 0.3 with a ``DeprecationWarning``.

0.3 laid the package out by capability (``flow/``, ``judging/``, ``batch/``, ``report/``). A
module that moved stays importable under its old path until 0.4: the first import of the old
path warns once, naming the new one, and yields the very same module object (so
``sae_match_lens.linking is sae_match_lens.flow.linking``). Three old modules became packages
(``flow``, ``batch``, ``report``); the names they defined are forwarded from the package to the
module that now holds them (:func:`forward_names`), again with one warning per name. Names that
0.2 exported from :mod:`sae_match_lens` and 0.3 keeps in their submodule warn the same way
(:func:`warn_unexported`).

Nothing here imports torch: it runs when :mod:`sae_match_lens` is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

__all__ = ["MOVED_MODULES", "forward_names", "install_moved_module_finder", "warn_moved",
           "warn_unexported"]

PACKAGE = "sae_match_lens"
REMOVED_IN = "0.4"

MOVED_MODULES: dict[str, str] = {
    "linking": "flow.linking",
    "coactivation": "flow.coactivation",
    "causal": "flow.causal",
    "judge": "judging.judge",
    "semantic": "judging.semantic",
    "steering_eval": "judging.steering_scores",
    "rowlog": "judging.rowlog",
    "plan": "batch.plan",
    "store": "batch.store",
    "batch_cli": "batch.cli",
    "demo": "report.demo",
    "flow_report": "report.flow_section",
    "steering_report": "report.steering_section",
    "verdicts": "report.verdicts",
    "viewer": "report.viewer",
}
"""Old module (under :mod:`sae_match_lens`) → its 0.3 path. The old modules ``flow``, ``batch``
and ``report`` are packages now; their names are forwarded to ``flow.graph``, ``batch.runs`` and
``report.document``."""


_OWN_FILES = frozenset({__file__, os.path.join(os.path.dirname(__file__), "__init__.py")})


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside this module, the package's ``__init__`` and
    the import machinery: the user's line that named the old path."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename in _OWN_FILES
                                 or frame.f_code.co_filename.startswith("<frozen importlib")):
        # ``warnings`` itself skips the import machinery's frames without counting them
        if not frame.f_code.co_filename.startswith("<frozen importlib"):
            level += 1
        frame = frame.f_back
    return level


def warn_moved(old: str, new: str) -> None:
    """One ``DeprecationWarning``: ``old`` is now ``new``, and the old path goes in 0.4."""
    warnings.warn(f"{old} moved to {new} in 0.3; import it from there ({old} goes in {REMOVED_IN}).",
                  DeprecationWarning, stacklevel=_caller_stacklevel())


def warn_unexported(old: str, home: str) -> None:
    """One ``DeprecationWarning``: ``old`` (a top-level name of 0.2) is no longer exported by
    :mod:`sae_match_lens`; it lives in ``home``."""
    name = old.rpartition(".")[2]
    warnings.warn(f"{old} is no longer exported at the top level in 0.3; import it from its "
                  f"module: from {home} import {name} (the old name goes in {REMOVED_IN}).",
                  DeprecationWarning, stacklevel=_caller_stacklevel())


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``sae_match_lens.<old>`` and loads it as the module at its new path."""

    def find_spec(self, fullname: str, path: Any, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        new = f"{PACKAGE}.{MOVED_MODULES[old.rpartition('.')[2]]}"
        warn_moved(old, new)
        # the import system hands out whatever sys.modules holds under the old name afterwards
        sys.modules[old] = importlib.import_module(new)


def install_moved_module_finder() -> None:
    """Make the old module paths of :data:`MOVED_MODULES` importable (idempotent). The finder
    goes first: it answers only for those exact names, which must never resolve to a stale file
    (an older copy of the package on the path)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())


def forward_names(package: str, module: str, submodules: Iterable[str]) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` for ``package``, an old module turned into a package: its
    ``submodules`` import as usual; any other name is looked up in ``package.module``, with one
    ``DeprecationWarning`` per name naming the new path.

    Args:
        package: the package's dotted name (its ``__name__``).
        module: the submodule (relative name) that now holds the old module's names.
        submodules: the package's submodules (relative names).

    Returns:
        The function to assign to the package's ``__getattr__``.
    """
    subs = frozenset(submodules)

    def forwarded(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)  # AttributeError if absent
        warn_moved(f"{package}.{name}", f"{package}.{module}.{name}")
        setattr(sys.modules[package], name, value)
        return value

    return forwarded
