"""Packages whose public names load on first use.

A package calls :func:`install` with its public names and the modules that define
them; ``import package`` then loads none of those modules (so the command line's
``--help`` does not pay for torch), and ``package.name`` imports its module once.

Example:
    >>> import lenskit.evaluation as evaluation
    >>> from lenskit.evaluation import layer_kl
    >>> import lenskit.evaluation.layer_kl
    >>> callable(evaluation.layer_kl)
    True
"""

import importlib
import sys
import types
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package whose public names (``_lazy_names``) load on first use.

    A public name stays the object it names when a submodule of the same name is
    imported (the import system would otherwise set the attribute to the submodule).
    """

    _lazy_names: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        lazy = self.__dict__.get("_lazy_names", {})
        if name not in lazy:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(lazy[name]), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        lazy = self.__dict__.get("_lazy_names", {})
        if isinstance(value, types.ModuleType) and lazy.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self.__dict__.get("_lazy_names", {})})


def install(module_name: str, names: dict[str, str]) -> None:
    """Make the public ``names`` of the package ``module_name`` load on first use.

    Args:
        module_name: The package (``__name__`` of its ``__init__``).
        names: Each public name, mapped to the module that defines it.
    """
    module = sys.modules[module_name]
    module.__dict__["_lazy_names"] = dict(names)
    module.__class__ = _LazyPackage
