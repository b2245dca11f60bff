"""A package's public names imported on first use (PEP 562), so that importing the package,
or one of its light modules (a registry), does not import the heavy ones."""

from __future__ import annotations

import importlib


def lazy_names(package: str, where: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package`` whose name ``n`` lives in its submodule
    ``where[n]``."""

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*vars(importlib.import_module(package)), *where])

    return __getattr__, __dir__
