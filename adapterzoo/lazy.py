"""Names a package loads on first read (PEP 562), so importing the package loads no torch."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_names(package: str, where: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: each name of `where` (name -> relative module)
    is imported the first time it is read, then kept in the package (later reads skip this)."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> object:
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
