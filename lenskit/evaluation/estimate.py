"""How long an evaluation takes here, estimated from this machine's measured matmul rates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lenskit.lenses.base import Lens, point_rows
from lenskit.models import ModelAdapter
from lenskit.readout import matmul_rates, resolve_precision

__all__ = ["expected_seconds"]


def expected_seconds(
    model: Any,
    lenses: Sequence[Lens],
    tokens: int,
    *,
    precision: str | None = None,
    efficiency: float = 0.5,
    points: Sequence[str] = ("resid_pre",),
) -> float:
    """About how long :func:`evaluate` takes here, from this machine's measured matmul rate.

    The readout floor (one ``d_model x d_vocab`` matmul per token, covered layer and lens,
    and one for the model's own output, at :func:`lenskit.readout.matmul_rates`) over
    ``efficiency``, plus the forward passes (two flops per parameter and token, float32).
    An estimate for a quiet machine, not a promise.
    """
    adapter = ModelAdapter(model)
    chosen = resolve_precision(precision, adapter.W_U.device)
    rates = matmul_rates(adapter.W_U.device)
    rows = (point_rows(list(lenses), points) if lenses else adapter.rows())[:-1]
    rows = sum(lens.covers_point(r.layer, r.point) for lens in lenses for r in rows) + 1
    readout = tokens * rows * 2 * adapter.d_model * adapter.d_vocab
    forward = tokens * 2 * sum(p.numel() for p in model.parameters())
    rate = rates.get(chosen, rates["fp32"])  # fp16 is not timed on CPUs: as float32
    seconds = readout / (rate * 1e9) / efficiency
    return seconds + forward / (rates["fp32"] * 1e9) / efficiency
