"""lenskit: see how a transformer builds its next-token prediction, layer by layer.

Example:
    >>> import lenskit
    >>> model = lenskit.load_model("tiny-llama")
    >>> lens = lenskit.get_lens("logit", model)
    >>> traj = lenskit.trajectory(model, lens, "a b c d")
    >>> traj.lens_kind, traj.model_name
    ('logit', 'tiny-llama')
"""

import importlib
import sys
import types
from typing import Any

from lenskit.errors import LenskitError

# The public API is imported on first use, so that `import lenskit` (and the command
# line's --help and its argument errors) does not pay for torch and TransformerLens.
_LAZY = {
    "DEFAULT_MODEL": "lenskit.models",
    "Lens": "lenskit.lenses",
    "ModelAdapter": "lenskit.models",
    "Trajectory": "lenskit.trajectory",
    "available_lenses": "lenskit.lenses",
    "get_lens": "lenskit.lenses",
    "load_model": "lenskit.models",
    "register_lens": "lenskit.lenses",
    "trajectory": "lenskit.trajectory",
}


class _Package(types.ModuleType):
    """The ``lenskit`` package: public names load on first use.

    ``lenskit.trajectory`` stays the function when its module of the same name is
    imported (the import system would otherwise set the attribute to the module).
    """

    def __getattr__(self, name: str) -> Any:
        if name not in _LAZY:
            raise AttributeError(f"module 'lenskit' has no attribute {name!r}")
        value = getattr(importlib.import_module(_LAZY[name]), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_LAZY})


sys.modules[__name__].__class__ = _Package

__all__ = [
    "DEFAULT_MODEL",
    "Lens",
    "LenskitError",
    "ModelAdapter",
    "Trajectory",
    "available_lenses",
    "get_lens",
    "load_model",
    "register_lens",
    "trajectory",
]
__version__ = "0.1.0"
