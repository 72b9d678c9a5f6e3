"""Training lenses: the tuned lens (closed form, then exact KL) and the Jacobian lens.

- :mod:`~lenskit.training.config`: :class:`TrainConfig`, every setting of a run, and
  :data:`QUICK`, the app's smaller preset.
- :mod:`~lenskit.training.state`: :class:`RunState`, what a checkpoint holds.
- :mod:`~lenskit.training.closed_form`: the least-squares start.
- :mod:`~lenskit.training.kl_step`: one exact-KL gradient step (float32 or bfloat16
  matmuls), and the optimizer; :mod:`~lenskit.training.precision` takes the readout's
  precision choice (``LENSKIT_PRECISION``, else measured).
- :mod:`~lenskit.training.phases`: the phases of a run.
- :mod:`~lenskit.training.clock`: a run's state, checkpoints and wall-clock planning.
- :mod:`~lenskit.training.loop`: :func:`train_tuned_lens`, the resumable run.
- :mod:`~lenskit.training.result`: :class:`TrainResult` and ``metrics.json``.
- :mod:`~lenskit.training.checkpoints`: what an output folder holds; unfinished runs.
- :mod:`~lenskit.training.lock`: one run per output folder.
- :mod:`~lenskit.training.distributed`: data parallelism under ``torchrun``.
- :mod:`~lenskit.training.jacobian`: fitting a J-lens prompt by prompt.
"""

from lenskit.lazy import install

# Public names load on first use: `from lenskit.x import Config` stays light.
_LAZY = {
    "CHECKPOINT_FILE": "lenskit.training.checkpoints",
    "METRICS_FILE": "lenskit.training.result",
    "QUICK": "lenskit.training.config",
    "RunState": "lenskit.training.state",
    "TrainConfig": "lenskit.training.config",
    "TrainResult": "lenskit.training.result",
    "UnfinishedRun": "lenskit.training.checkpoints",
    "checkpoint_config": "lenskit.training.checkpoints",
    "delete_unfinished": "lenskit.training.checkpoints",
    "holder": "lenskit.training.lock",
    "train_tuned_lens": "lenskit.training.loop",
    "unfinished_runs": "lenskit.training.checkpoints",
}

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "QUICK",
    "RunState",
    "TrainConfig",
    "TrainResult",
    "UnfinishedRun",
    "checkpoint_config",
    "delete_unfinished",
    "holder",
    "train_tuned_lens",
    "unfinished_runs",
]

install(__name__, _LAZY)
