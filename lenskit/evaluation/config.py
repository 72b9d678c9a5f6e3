"""Settings of a corpus evaluation: :class:`EvalConfig`, and the app's preset.

The ``lenskit eval`` flags take their defaults from it, and the app's Evaluate page from
:data:`QUICK`, a smaller run of the same settings.

Example:
    >>> from lenskit.evaluation.config import QUICK, EvalConfig
    >>> EvalConfig(tokens=4096).seq_len, QUICK.tokens
    (256, 2048)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lenskit.errors import LenskitError
from lenskit.settings import setting

__all__ = ["DEFAULT_SEQ_LEN", "QUICK", "EvalConfig"]

DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class EvalConfig:
    """How much text an evaluation reads, and how (see :func:`lenskit.evaluation.evaluate`)."""

    tokens: int = setting(8192, "tokens to read, in whole chunks")
    seq_len: int = setting(DEFAULT_SEQ_LEN, "tokens per chunk")
    batch_size: int = setting(4, "chunks per forward pass")
    seed: int = setting(0, "seed of the document order and the held-out split")
    held_out: float | None = setting(
        None, "score only the documents `lenskit train --held-out FRACTION` holds out"
    )
    transfer: bool = setting(
        False, "also score each tuned translator on every layer (n_layers x slower)"
    )

    def __post_init__(self) -> None:
        for name in ("tokens", "seq_len", "batch_size", "seed"):
            value = getattr(self, name)
            low = 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LenskitError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.held_out is not None and not 0 < self.held_out < 1:
            raise LenskitError(
                f"held_out must be between 0 and 1, got {self.held_out}: pass e.g. 0.1"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON data (also the keyword arguments of ``evaluate``)."""
        return dataclasses.asdict(self)


QUICK = EvalConfig(tokens=2048, seq_len=128, held_out=0.1)
"""The app's Evaluate page defaults: a run of about a minute for a small model."""
