"""lenskit: see how a transformer builds its next-token prediction, layer by layer.

Example:
    >>> import lenskit
    >>> model = lenskit.load_model("tiny-llama")
    >>> lens = lenskit.get_lens("logit", model)
    >>> traj = lenskit.trajectory(model, lens, "a b c d")
    >>> traj.lens_kind, traj.model_name
    ('logit', 'tiny-llama')
"""

from lenskit.errors import LenskitError
from lenskit.lazy import install

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
    "retain_freed_memory": "lenskit.allocator",
    "trajectory": "lenskit.trajectory",
}


# `lenskit.trajectory` stays the function when its module of the same name is imported.
install(__name__, _LAZY)

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
    "retain_freed_memory",
    "trajectory",
]
__version__ = "0.1.0"
