"""lenskit: see how a transformer builds its next-token prediction, layer by layer."""

from lenskit.errors import LenskitError
from lenskit.lenses import Lens, available_lenses, get_lens, register_lens
from lenskit.models import DEFAULT_MODEL, ModelAdapter, load_model
from lenskit.trajectory import Trajectory, trajectory

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
