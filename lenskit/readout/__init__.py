"""The readout engine: residual rows -> final norm -> unembedding -> statistics, fast.

Every full-vocabulary computation in lenskit ends here. :class:`Readout` reads residuals
through the model's own final norm and unembedding, a block of rows per matmul, in the
fastest precision this machine has (:mod:`~lenskit.readout.engine`), and
:func:`logit_stats` takes log-sum-exp, entropy, KL to the model's output, chosen-token
log-probabilities, ranks and the top-k of each block of logits in float32, a
cache-sized block of rows at a time (:mod:`~lenskit.readout.stats`).

Precision (``precision=`` or the ``LENSKIT_PRECISION`` environment variable; see
:mod:`~lenskit.readout.precision`):

- ``"exact"``: float32 everywhere, the model's own ``x @ W_U + b_U``.
- ``"bf16"`` / ``"fp16"``: the matmul's inputs rounded to that type, products summed in
  float32. Each row's head (its :data:`EXACT_HEAD` most likely tokens and the
  reference's :data:`REFERENCE_HEAD`) is then recomputed in float32, so top-k,
  log-sum-exp, entropy and KL are exact where the probability lies and only the tail
  carries the rounding (on CPUs the matmul's output is rounded to bf16 as well).
  Statistics are float32 as in exact mode; :meth:`Readout.read_stats` takes them from
  the rounded block a chunk at a time, with no float32 copy of the block.
- ``"auto"`` (default): a one-off micro-benchmark per device (:func:`matmul_rates`,
  cached in memory and in lenskit's cache folder) picks ``"bf16"`` where it is at least
  :data:`SPEEDUP_NEEDED` times faster than float32, else ``"exact"``.

Example:
    >>> import torch, lenskit
    >>> from lenskit.readout import Readout
    >>> model = lenskit.load_model("tiny-llama")
    >>> engine = Readout(lenskit.ModelAdapter(model), precision="exact")
    >>> h = torch.randn(3, model.cfg.d_model)
    >>> stats = engine.read_stats(h, engine.reference(h), torch.zeros(3, 1, dtype=torch.long),
    ...                           top_k=2)
    >>> [round(float(v), 6) for v in stats.kl]  # each row against itself
    [0.0, 0.0, 0.0]
"""

from lenskit.readout.engine import (
    EXACT_HEAD,
    MATMUL_ROWS,
    REFERENCE_HEAD,
    ReadLogits,
    Readout,
    head_ids,
    scratch_buffer,
)
from lenskit.readout.precision import (
    PRECISION_ENV,
    PRECISIONS,
    SPEEDUP_NEEDED,
    lowp_mm,
    matmul_dtype,
    matmul_rates,
    resolve_precision,
)
from lenskit.readout.stats import (
    STATS_ROWS,
    RowStats,
    concat_stats,
    logit_stats,
    pair_divergences,
    top_k,
)

__all__ = [
    "EXACT_HEAD",
    "MATMUL_ROWS",
    "PRECISIONS",
    "PRECISION_ENV",
    "REFERENCE_HEAD",
    "SPEEDUP_NEEDED",
    "STATS_ROWS",
    "ReadLogits",
    "Readout",
    "RowStats",
    "concat_stats",
    "head_ids",
    "logit_stats",
    "lowp_mm",
    "matmul_dtype",
    "matmul_rates",
    "pair_divergences",
    "resolve_precision",
    "scratch_buffer",
    "top_k",
]
