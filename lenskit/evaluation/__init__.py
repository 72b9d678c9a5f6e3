"""Evaluating lenses over a corpus.

- :mod:`~lenskit.evaluation.evaluator`: :func:`evaluate`, every metric with error bars.
- :mod:`~lenskit.evaluation.results`: :class:`EvalResult` and the running chunk moments.
- :mod:`~lenskit.evaluation.layer_kl`: the lean KL-only pass that training uses.
- :mod:`~lenskit.evaluation.chunks`: the token chunks an evaluation reads.
- :mod:`~lenskit.evaluation.estimate`: :func:`expected_seconds`, how long it will take.
"""

from lenskit.lazy import install

# Public names load on first use: `from lenskit.x import Config` stays light.
_LAZY = {
    "DEFAULT_SEQ_LEN": "lenskit.evaluation.config",
    "EvalConfig": "lenskit.evaluation.config",
    "QUICK": "lenskit.evaluation.config",
    "EvalResult": "lenskit.evaluation.results",
    "STATS_DTYPE": "lenskit.evaluation.evaluator",
    "eval_chunks": "lenskit.evaluation.chunks",
    "evaluate": "lenskit.evaluation.evaluator",
    "expected_seconds": "lenskit.evaluation.estimate",
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


# `layer_kl` stays the function once its module of the same name loads.
install(__name__, _LAZY)
