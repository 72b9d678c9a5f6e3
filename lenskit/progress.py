"""Progress reports that long loops hand to a caller's callback (the app draws them)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Progress", "ProgressCallback"]


@dataclass(frozen=True)
class Progress:
    """Where a long loop stands, passed to its ``on_progress`` callback after each batch.

    Attributes:
        phase: What runs, e.g. ``"closed-form"``, ``"fine-tune"`` or ``"evaluate"``.
        done: Tokens of this phase done (over all resumed sessions, where a loop resumes).
        total: Tokens of this phase in all.
        tokens_per_s: Tokens per second of this phase so far in this session.
        seconds: Wall time so far (over all resumed sessions).
        kl_bits: Mean KL (bits per token and layer) of the last batch, where a loop has one.
    """

    phase: str
    done: int
    total: int
    tokens_per_s: float
    seconds: float
    kl_bits: float | None = None

    @property
    def fraction(self) -> float:
        """Share of the phase done, in [0, 1]."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else 1.0

    @property
    def eta_seconds(self) -> float:
        """Seconds left in this phase at the current speed (NaN before a speed is known)."""
        rate = self.tokens_per_s
        return (self.total - self.done) / rate if rate > 0 else math.nan


ProgressCallback = Callable[[Progress], None]
"""A callback taking a :class:`Progress`; if it raises, the loop stops (see the loop's docs)."""
