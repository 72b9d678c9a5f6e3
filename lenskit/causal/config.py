"""Settings of a causal basis extraction: :class:`CausalBasisConfig`.

The ``lenskit causal-basis`` flags take their defaults from it, and the app's Causal basis
page from :data:`QUICK`, a smaller run of the same settings.

Example:
    >>> from lenskit.causal.config import CausalBasisConfig
    >>> CausalBasisConfig(k=4, ablation="zero").to_dict()["k"]
    4
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lenskit.errors import LenskitError
from lenskit.settings import setting

__all__ = ["ABLATIONS", "QUICK", "CausalBasisConfig"]

ABLATIONS = ("mean", "zero", "resample")
"""What an ablated direction's coordinate is set to (see :mod:`lenskit.causal.influence`)."""


@dataclass(frozen=True)
class CausalBasisConfig:
    """Settings of a causal basis extraction.

    Attributes:
        k: Directions per layer.
        ablation: ``mean``, ``zero`` or ``resample`` (see :mod:`lenskit.causal.influence`).
        tokens: Training tokens (whole chunks) the directions are optimised on.
        eval_tokens: Held-out tokens the influences are reported on.
        seq_len: Tokens per chunk.
        held_out: Fraction of documents held out.
        seed: Seed of the split, the document order and resample ablation.
        max_iter: Most L-BFGS iterations per direction.
        tol: Convergence: relative change of the objective over one iteration.
        skip_first: Leading positions of each chunk left out.
        model_influence: Also measure each direction's influence on the model.
        batch_size: Chunks per forward pass of the model.
    """

    k: int = setting(8, "directions per layer")
    ablation: str = setting("mean", "what an ablated direction is set to", choices=tuple(ABLATIONS))
    tokens: int = setting(2048, "training tokens the directions are optimised on")
    eval_tokens: int = setting(1024, "held-out tokens the reported influences use")
    seq_len: int = setting(256, "tokens per chunk")
    held_out: float = setting(0.1, "held-out fraction of the documents")
    seed: int = setting(0, "seed of the split, the document order and resample ablation")
    max_iter: int = setting(50, "L-BFGS iterations per direction at most")
    tol: float = setting(1e-4, "relative change of the objective that ends a search")
    skip_first: int = setting(1, "leading positions of each chunk left out")
    model_influence: bool = setting(
        True, "also measure each direction's influence on the model (k forward passes)"
    )
    batch_size: int = setting(4, "chunks per forward pass of the model")

    def __post_init__(self) -> None:
        positive = ("k", "tokens", "eval_tokens", "seq_len", "max_iter", "batch_size")
        for name in (*positive, "seed", "skip_first"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LenskitError(f"{name} must be an integer, got {value!r}")
            if value < (1 if name in positive else 0):
                raise LenskitError(
                    f"{name} must be >= {1 if name in positive else 0}, got "
                    f"{value}: pass a larger {name}"
                )
        if self.ablation not in ABLATIONS:
            raise LenskitError(
                f"unknown ablation {self.ablation!r}: use one of {', '.join(ABLATIONS)}"
            )
        if not 0 < self.held_out < 1:
            raise LenskitError(
                f"held_out must be between 0 and 1, got {self.held_out}: pass e.g. 0.1"
            )
        if not 0 < self.tol < 1:
            raise LenskitError(f"tol must be between 0 and 1, got {self.tol}: pass e.g. 1e-4")
        if self.skip_first >= self.seq_len:
            raise LenskitError(
                f"skip_first={self.skip_first} leaves nothing of chunks of "
                f"{self.seq_len} tokens: lower it"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CausalBasisConfig:
        """Settings from :meth:`to_dict` (unknown keys are refused)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LenskitError(f"unknown causal basis settings {', '.join(unknown)}: drop them")
        return cls(**data)


QUICK = CausalBasisConfig(k=4, tokens=512, eval_tokens=256, seq_len=128)
"""The app's Causal basis page defaults: about a minute per layer of a small model on 2 cores."""
