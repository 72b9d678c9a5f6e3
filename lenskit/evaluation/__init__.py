"""Evaluating lenses over a corpus.

- :mod:`~lenskit.evaluation.evaluator`: :func:`evaluate`, every metric with error bars.
- :mod:`~lenskit.evaluation.results`: :class:`EvalResult` and the running chunk moments.
- :mod:`~lenskit.evaluation.layer_kl`: the lean KL-only pass that training uses.
- :mod:`~lenskit.evaluation.chunks`: the token chunks an evaluation reads.
"""

from lenskit.evaluation.chunks import DEFAULT_SEQ_LEN, eval_chunks
from lenskit.evaluation.evaluator import OBJECTIVES, STATS_DTYPE, evaluate, lens_objective
from lenskit.evaluation.layer_kl import layer_kl
from lenskit.evaluation.results import EvalResult

__all__ = [
    "DEFAULT_SEQ_LEN",
    "OBJECTIVES",
    "STATS_DTYPE",
    "EvalResult",
    "eval_chunks",
    "evaluate",
    "layer_kl",
    "lens_objective",
]
