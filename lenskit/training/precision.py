"""A training run's matmul precision: :mod:`lenskit.readout`'s choice, in training's words.

Training settings say ``"auto"``, ``"float32"`` or ``"bfloat16"``; the readout engine says
``"auto"``, ``"exact"``, ``"bf16"`` or ``"fp16"``. This module is the one place where the
two meet, so a run picks its precision exactly as every readout does:

- ``"float32"`` / ``"bfloat16"``: as given (readout ``"exact"`` / ``"bf16"``).
- ``"auto"``: ``$LENSKIT_PRECISION`` if set, else the readout's measured choice
  (:func:`lenskit.readout.resolve_precision`: bfloat16 where its matmul is at least
  :data:`lenskit.readout.SPEEDUP_NEEDED` times faster than float32). A readout
  precision of ``"fp16"`` trains in float32: the step's float16 row sums could overflow.

A run in bfloat16 also runs the model's own forward passes under bfloat16 autocast where
it trains (:func:`forward_autocast`).

Example:
    >>> resolve_precision("float32", "cpu")
    'float32'
    >>> readout_precision("bfloat16")
    'bf16'
    >>> resolve_precision("auto", "cpu") in ("float32", "bfloat16")
    True
"""

from __future__ import annotations

from typing import Any

import torch

from lenskit import readout

__all__ = ["forward_autocast", "matmul_rates", "readout_precision", "resolve_precision"]

_TO_READOUT = {"auto": None, "float32": "exact", "bfloat16": "bf16"}
_FROM_READOUT = {"exact": "float32", "bf16": "bfloat16", "fp16": "float32"}


def readout_precision(precision: str) -> str | None:
    """The readout's name for a training precision (None for ``"auto"``: the environment's)."""
    return _TO_READOUT[precision]


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``"float32"`` or ``"bfloat16"``: the precision the KL step runs in on ``device``.

    Raises:
        LenskitError: If ``$LENSKIT_PRECISION`` names no precision.
    """
    return _FROM_READOUT[readout.resolve_precision(readout_precision(precision), device)]


def matmul_rates(device: str | torch.device, *, fresh: bool = False) -> dict[str, float]:
    """GFLOP/s of a readout-shaped matmul as the KL step runs it, by training precision.

    ``"float32"`` is a float32 matmul, ``"bfloat16"`` one with bfloat16 inputs and output
    (:func:`lenskit.readout.matmul_rates`; ``fresh=True`` measures again).
    """
    rates = readout.matmul_rates(device, fresh=fresh)
    return {"float32": rates["fp32"], "bfloat16": rates["bf16"]}


def forward_autocast(model: Any) -> torch.dtype | None:
    """The autocast dtype of a bfloat16 run's forward passes: bfloat16 for a float32 model.

    A run in ``"bfloat16"`` also runs the model's matmuls in bfloat16 (float32 weights,
    norms and residual stream) where it trains: the closed form's passes and the KL
    steps'. On SmolLM2 that pass is 2.5x faster here, its output distribution is 0.0005
    bits (mean KL) from the float32 one, and closed-form lenses fitted either way score
    the same to 0.001 bits. Validation and reports keep float32 passes. None for a model
    in a half dtype (nothing to gain).
    """
    return torch.bfloat16 if next(model.parameters()).dtype == torch.float32 else None
