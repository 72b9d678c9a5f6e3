"""The result of a per-component attribution: :class:`Attribution`.

One prediction's direct and ablation effects per component (the embedding, then each
block's attention and MLP outputs), as one lens reads it; with a table
(:meth:`Attribution.to_frame`) and JSON (:meth:`Attribution.to_dict`,
:meth:`Attribution.from_dict`). :func:`lenskit.attribution.attribute` computes one.

Example:
    >>> import lenskit
    >>> from lenskit.attribution import attribute
    >>> from lenskit.attribution_result import Attribution
    >>> model = lenskit.load_model("tiny-llama")
    >>> result = attribute(model, lenskit.get_lens("logit", model), "Hello", "!")
    >>> Attribution.from_dict(result.to_dict()).labels == result.labels
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lenskit.attribution_config import ABLATE, AT, METRICS

__all__ = ["Attribution"]


@dataclass(frozen=True)
class Attribution:
    """Component effects on one prediction, as one lens reads it.

    Attributes:
        model_name: The model.
        lens_kind: The lens kind.
        lens_source: Where the lens came from (a folder, ``hub:...``), if anywhere.
        tokens: The prompt's tokens, as text.
        position: The position read (non-negative).
        target: The target token's text.
        target_id: Its id.
        metric: ``logprob``, ``logit`` or ``kl``.
        unit: ``bits`` or ``logits``.
        at: ``next`` or ``output``.
        ablate: ``position`` or ``all``.
        contrast: The contrast token of the ``logit`` metric, if one was given.
        labels: One label per component (``embed``, ``L0.attn``, ``L0.mlp``, ...).
        kinds: ``embed``, ``attn`` or ``mlp`` per component.
        layers: Block per component (-1 for the embedding).
        read_rows: The row each component is read at (``L3``, ``L3.mid``, ``output``).
        direct: Direct effect per component, in ``unit``.
        ablation: Ablation effect per component (NaN for the embedding, or where
            ablation was not run).
        row_values: The metric as the lens reads the full stream at each read row.
        output_value: The metric at the final residual (the model's own output).
        constant: With ``at="output"``: the linearised metric of the constant terms
            (norm and unembedding biases); ``sum(direct) + constant == output_value``
            for the ``logit`` metric where the identity holds. None with ``at="next"``.
    """

    model_name: str
    lens_kind: str
    lens_source: str | None
    tokens: tuple[str, ...]
    position: int
    target: str
    target_id: int
    metric: str
    unit: str
    at: str
    ablate: str
    contrast: str | None
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    read_rows: tuple[str, ...]
    direct: np.ndarray = field(repr=False)
    ablation: np.ndarray = field(repr=False)
    row_values: np.ndarray = field(repr=False)
    output_value: float = 0.0
    constant: float | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in ("kinds", "layers", "read_rows", "direct", "ablation", "row_values"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, not {n}")
        if self.metric not in METRICS or self.at not in AT or self.ablate not in ABLATE:
            raise ValueError(f"bad metric/at/ablate: {self.metric}/{self.at}/{self.ablate}")
        if not 0 <= self.position < len(self.tokens):
            raise ValueError(f"position {self.position} is outside {len(self.tokens)} tokens")

    @property
    def n_layers(self) -> int:
        """Number of blocks."""
        return max(self.layers) + 1

    def by_layer(self, values: str = "direct") -> dict[str, np.ndarray]:
        """``{"attn": [...], "mlp": [...]}`` per block of ``direct`` or ``ablation``."""
        data = np.asarray(getattr(self, values), dtype=float)
        out = {}
        for kind in ("attn", "mlp"):
            out[kind] = np.array([v for v, k in zip(data, self.kinds, strict=True) if k == kind])
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per component."""
        return pd.DataFrame(
            {
                "component": self.labels,
                "kind": self.kinds,
                "layer": self.layers,
                "read_at": self.read_rows,
                f"direct_{self.unit}": self.direct,
                f"ablation_{self.unit}": self.ablation,
                f"row_value_{self.unit}": self.row_values,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready contents (NaN as None)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value = [None if not np.isfinite(v) else float(v) for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attribution:
        """Inverse of :meth:`to_dict`."""
        arrays = ("direct", "ablation", "row_values")
        values = dict(data)
        for name in arrays:
            values[name] = np.array([np.nan if v is None else v for v in data[name]], float)
        for name in ("tokens", "labels", "kinds", "layers", "read_rows"):
            values[name] = tuple(data[name])
        return cls(**values)
