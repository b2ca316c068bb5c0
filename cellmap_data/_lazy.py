"""Module attributes imported on first use, so that importing a module that only re-exports
names (the package root, the reference library's module paths) stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(module: str, sources: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for module ``module`` whose names ``sources`` maps to the
    modules defining them (absolute, or relative to ``module``'s package)."""
    this = importlib.import_module(module)  # importing now: already in sys.modules
    namespace = this.__dict__
    package = module if hasattr(this, "__path__") else module.rsplit(".", 1)[0]

    def getattr_(name: str) -> Any:
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source, package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(sources))

    return getattr_, dir_
