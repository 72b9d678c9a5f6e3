"""Training lenses: the tuned lens (closed form, then exact KL) and the Jacobian lens.

- :mod:`~lenskit.training.config`: :class:`TrainConfig`, every setting of a run.
- :mod:`~lenskit.training.closed_form`: the least-squares start.
- :mod:`~lenskit.training.kl_step`: one exact-KL gradient step, and the optimizer.
- :mod:`~lenskit.training.loop`: :func:`train_tuned_lens`, the resumable run.
- :mod:`~lenskit.training.checkpoints`: what an output folder holds.
- :mod:`~lenskit.training.distributed`: data parallelism under ``torchrun``.
- :mod:`~lenskit.training.jacobian`: fitting a J-lens prompt by prompt.
"""

from lenskit.training.checkpoints import CHECKPOINT_FILE, checkpoint_config
from lenskit.training.config import TrainConfig
from lenskit.training.loop import METRICS_FILE, TrainResult, train_tuned_lens

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "TrainConfig",
    "TrainResult",
    "checkpoint_config",
    "train_tuned_lens",
]
