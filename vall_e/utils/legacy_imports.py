"""Importing old packages that read their own version through `pkg_resources` (pyworld <= 0.3.5,
webrtcvad 2.0.10, which resemblyzer needs). setuptools 81 removed `pkg_resources`, and where it still
exists it warns on import. Rather than pin setuptools, such a module is imported with a throwaway
stand-in built on importlib.metadata, removed again afterwards, so nothing else ever sees a fake
`pkg_resources`."""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
import warnings
from typing import Any


def _stand_in() -> types.ModuleType:
    def get_distribution(name: str) -> Any:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return types.SimpleNamespace(project_name=name, version=version)

    shim = types.ModuleType("pkg_resources")
    shim.get_distribution = get_distribution  # type: ignore[attr-defined]
    return shim


def import_with_pkg_resources(name: str) -> types.ModuleType:
    """`import name` for a module whose import needs `pkg_resources.get_distribution` and nothing else.
    A missing `name` raises ModuleNotFoundError as a plain import does."""
    if name in sys.modules:
        return sys.modules[name]
    missing = object()
    before = sys.modules.get("pkg_resources", missing)
    sys.modules["pkg_resources"] = _stand_in()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(name)
    finally:
        if before is missing:
            sys.modules.pop("pkg_resources", None)
        else:
            sys.modules["pkg_resources"] = before  # type: ignore[assignment]
