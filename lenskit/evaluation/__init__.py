"""Evaluating lenses over a corpus.

- :mod:`~lenskit.evaluation.evaluator`: :func:`evaluate`, every metric with error bars.
- :mod:`~lenskit.evaluation.results`: :class:`EvalResult` and the running chunk moments.
- :mod:`~lenskit.evaluation.layer_kl`: the lean KL-only pass that training uses.
- :mod:`~lenskit.evaluation.chunks`: the token chunks an evaluation reads.
"""

import importlib
import sys
import types
from typing import Any

# Public names load on first use: `from lenskit.x import Config` stays light.
_LAZY = {
    "DEFAULT_SEQ_LEN": "lenskit.evaluation.config",
    "EvalConfig": "lenskit.evaluation.config",
    "QUICK": "lenskit.evaluation.config",
    "EvalResult": "lenskit.evaluation.results",
    "STATS_DTYPE": "lenskit.evaluation.evaluator",
    "eval_chunks": "lenskit.evaluation.chunks",
    "evaluate": "lenskit.evaluation.evaluator",
    "expected_seconds": "lenskit.evaluation.evaluator",
    "layer_kl": "lenskit.evaluation.layer_kl",
}

__all__ = [
    "DEFAULT_SEQ_LEN",
    "QUICK",
    "STATS_DTYPE",
    "EvalConfig",
    "EvalResult",
    "eval_chunks",
    "evaluate",
    "expected_seconds",
    "layer_kl",
]


class _Package(types.ModuleType):
    """Public names load on first use; ``layer_kl`` stays the function once its module loads."""

    def __getattr__(self, name: str) -> Any:
        if name not in _LAZY:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(_LAZY[name]), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # the import system sets a submodule as an attribute of its package
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_LAZY})


sys.modules[__name__].__class__ = _Package
