"""What a finished training run returns and writes: :class:`TrainResult` and ``metrics.json``.

Example:
    >>> from lenskit.lenses.tuned import TunedLens
    >>> import lenskit
    >>> lens = TunedLens.untrained(lenskit.load_model("tiny-llama"))
    >>> n = len(lens.translators)
    >>> r = TrainResult(lens, 0, 64, 1.0, (2.0,) * n, (1.0,) * n)
    >>> list(r.to_frame().columns)
    ['layer', 'logit_kl_bits', 'tuned_kl_bits']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lenskit.lenses.tuned import TunedLens

__all__ = ["METRICS_FILE", "TrainResult", "mean_bits"]

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainResult:
    """A trained lens and its held-out per-layer KL (bits) next to the logit lens's.

    Attributes:
        lens: The trained lens.
        steps: KL fine-tuning steps taken.
        tokens: Tokens trained on (closed-form and KL steps).
        seconds: Wall time, over all resumed sessions.
        logit_kl: Held-out mean KL of the logit lens per block input (NaN: no report);
            for a lens with ``resid_mid`` rows, per row in stream order (``L0``,
            ``L0.mid``, ``L1``, ...).
        tuned_kl: Held-out mean KL of the trained lens, per row likewise (NaN: no report).
        kept_start: Rows whose start translator beat fine-tuning on the validation slice.
        timings: Seconds per phase and the KL step's tokens per second.
        precision: The KL step's matmul precision.
        labels: Row labels (``L0``, ``L0.mid``, ...) for a lens with ``resid_mid`` rows;
            empty for block inputs only.
        notes: What a wall-clock budget left out (the report, the validation choice).
    """

    lens: TunedLens
    steps: int
    tokens: int
    seconds: float
    logit_kl: tuple[float, ...]
    tuned_kl: tuple[float, ...]
    kept_start: tuple[int, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    precision: str = "float32"
    labels: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.logit_kl) != len(self.tuned_kl) or not self.logit_kl:
            raise ValueError("logit_kl and tuned_kl must have one value per layer")
        if self.labels and len(self.labels) != len(self.logit_kl):
            raise ValueError("labels must have one label per row of logit_kl")
        if self.steps < 0 or self.tokens < 0 or self.seconds < 0:
            raise ValueError("steps, tokens and seconds must be >= 0")

    @property
    def reported(self) -> bool:
        """Whether the lens was scored on held-out text."""
        return not any(math.isnan(v) for v in self.tuned_kl)

    def to_frame(self) -> pd.DataFrame:
        """One row per block input: ``layer``, ``logit_kl_bits``, ``tuned_kl_bits``.

        With sub-layer rows (``labels`` given) ``layer`` is the row index and a
        ``layer_label`` column (``L12``, ``L12.mid``) follows it.
        """
        columns: dict[str, Any] = {"layer": range(len(self.logit_kl))}
        if self.labels:
            columns["layer_label"] = list(self.labels)
        columns |= {"logit_kl_bits": self.logit_kl, "tuned_kl_bits": self.tuned_kl}
        return pd.DataFrame(columns)


def mean_bits(values: tuple[float, ...] | list[float]) -> float:
    """The mean of per-layer values (NaN where there are none)."""
    return sum(values) / len(values) if values else math.nan


def metrics_record(result: TrainResult, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``metrics.json`` contents: ``extra`` (config, command, ...) and the result."""
    return {
        **extra,
        "tokens_trained": result.tokens,
        "steps": result.steps,
        "precision": result.precision,
        "seconds": result.seconds,
        "timings": result.timings,
        "mean_kl_bits": (
            {"logit": mean_bits(result.logit_kl), "tuned": mean_bits(result.tuned_kl)}
            if result.reported
            else None
        ),
        "kept_start_layers": list(result.kept_start),
        "notes": list(result.notes),
        "per_layer": result.to_frame().to_dict(orient="records") if result.reported else None,
    }
