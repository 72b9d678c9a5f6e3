"""Corpus evaluation results: running per-chunk moments and the :class:`EvalResult` table.

Uncertainty: every mean is over equal-length token chunks, and its standard error is over
chunks (the sample standard deviation of the per-chunk means, ``ddof=1``, over
``sqrt(n_chunks)``). Chunks, not tokens, are the unit because tokens in one chunk are
strongly correlated; chunks are cut from a token stream, so a chunk may span the end of
one document and the start of the next (documents are not tracked once tokenized).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "COLUMNS",
    "METRICS",
    "PER_BYTE",
    "TRANSFER_COLUMNS",
    "ChunkMoments",
    "EvalResult",
    "json_safe",
    "metrics_frame",
    "transfer_frame",
]

METRICS = ("kl_bits", "ce_bits", "entropy_bits", "top1_agree")
"""Per-token means: ``KL(model output || lens)``, cross-entropy of the actual next token,
the lens's entropy (all in bits), and the fraction of tokens where the lens's top-1 is the
model's final top-1."""
PER_BYTE = ("kl_bits", "ce_bits", "entropy_bits")
"""Metrics also reported per UTF-8 byte of text, as ``<metric>_per_byte``."""
SE_UNIT = "chunk"
MODEL_NOTE = "the model's own output (reference): KL 0 and top-1 agreement 1 by definition"
UNCOVERED_NOTE = "not covered by this lens"
REFERENCE_OBJECTIVE = "reference"
"""The ``objective`` of the model's own row (each lens row names what its lens was fitted
for; see :attr:`lenskit.Lens.objective`)."""


def _metric_columns() -> list[str]:
    names = [*METRICS, *(f"{m}_per_byte" for m in PER_BYTE)]
    return [col for name in names for col in (name, f"{name}_se")]


COLUMNS = (
    "lens",
    "kind",
    "layer",
    "layer_label",
    *_metric_columns(),
    "covered",
    "objective",
    "note",
)
TRANSFER_COLUMNS = ("lens", "translator", "layer", "kl_bits", "kl_bits_se")


class ChunkMoments:
    """Running count, mean and sum of squared deviations of per-chunk values (float64).

    Batches are merged with Chan et al.'s update (equivalent to keeping sums and sums of
    squares, without their cancellation), so memory does not grow with the number of chunks.

    Args:
        shape: Shape of one chunk's values (e.g. ``(lens, layer, metric)``).
    """

    def __init__(self, shape: Sequence[int]) -> None:
        self.count = 0
        self.mean = torch.zeros(tuple(shape), dtype=torch.float64)
        self.m2 = torch.zeros(tuple(shape), dtype=torch.float64)

    def add(self, values: Float[Tensor, "*batch chunk"]) -> None:
        """Merge the values of a batch of chunks (the last axis)."""
        values = values.detach().to("cpu", torch.float64)
        n = values.shape[-1]
        if n == 0:
            return
        mean = values.mean(-1)
        m2 = (values - mean.unsqueeze(-1)).square().sum(-1)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.count * n / total)
        self.count = total

    def se(self) -> Float[Tensor, "*batch"]:
        """Standard error of the mean over chunks (NaN with fewer than two chunks)."""
        if self.count < 2:
            return torch.full_like(self.mean, math.nan)
        return (self.m2 / (self.count - 1) / self.count).sqrt()


def metrics_frame(
    kinds: dict[str, str],
    covered: list[list[bool]],
    labels: list[str],
    moments: ChunkMoments,
    reference: ChunkMoments,
    *,
    tokens_per_byte: float,
    notes: dict[str, str],
    objectives: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The long metrics table (:data:`COLUMNS`) from the running moments.

    Args:
        kinds: Lens kind per lens name, in table order.
        covered: Per lens and block input, whether the lens reads that layer.
        labels: Row labels ``L0``, ..., ``output`` (``n_layers + 1`` of them).
        moments: Per-chunk moments ``[lens, layer, metric]`` of :data:`METRICS`.
        reference: Per-chunk moments of the model's own cross-entropy and entropy.
        tokens_per_byte: Tokens per UTF-8 byte of text (NaN: per-byte columns are NaN).
        notes: Per lens name, a note for each of its rows.
        objectives: Per lens name, what the lens was fitted for (``objective`` column;
            missing names are ``"unspecified"``).
    """
    nan, n_layers = math.nan, len(labels) - 1
    mean, se = moments.mean.tolist(), moments.se().tolist()
    records = []
    for i, (name, kind) in enumerate(kinds.items()):
        for layer in range(n_layers):
            ok = covered[i][layer]
            row: dict[str, Any] = {
                "lens": name,
                "kind": kind,
                "layer": layer,
                "layer_label": labels[layer],
            }
            for m, metric in enumerate(METRICS):
                row[metric] = mean[i][layer][m] if ok else nan
                row[f"{metric}_se"] = se[i][layer][m] if ok else nan
            text = [notes.get(name, ""), "" if ok else UNCOVERED_NOTE]
            records.append(
                {
                    **row,
                    "covered": ok,
                    "objective": (objectives or {}).get(name, "unspecified"),
                    "note": "; ".join(t for t in text if t),
                }
            )
    (ce, entropy), (ce_se, entropy_se) = reference.mean.tolist(), reference.se().tolist()
    records.append(
        {
            "lens": "model",
            "kind": "model",
            "layer": n_layers,
            "layer_label": labels[n_layers],
            "kl_bits": 0.0,
            "kl_bits_se": 0.0,
            "ce_bits": ce,
            "ce_bits_se": ce_se,
            "entropy_bits": entropy,
            "entropy_bits_se": entropy_se,
            "top1_agree": 1.0,
            "top1_agree_se": 0.0,
            "covered": True,
            "objective": REFERENCE_OBJECTIVE,
            "note": MODEL_NOTE,
        }
    )
    for record in records:
        for metric in PER_BYTE:
            for suffix in ("", "_se"):
                record[f"{metric}_per_byte{suffix}"] = record[f"{metric}{suffix}"] * tokens_per_byte
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


def transfer_frame(names: list[str], moments: ChunkMoments) -> pd.DataFrame:
    """The long transfer table (:data:`TRANSFER_COLUMNS`) from moments ``[lens, i, j]``."""
    mean, se = moments.mean.tolist(), moments.se().tolist()
    n_layers = len(mean[0]) if mean else 0
    records = [
        {
            "lens": name,
            "translator": i,
            "layer": j,
            "kl_bits": mean[t][i][j],
            "kl_bits_se": se[t][i][j],
        }
        for t, name in enumerate(names)
        for i in range(n_layers)
        for j in range(n_layers)
    ]
    return pd.DataFrame.from_records(records, columns=list(TRANSFER_COLUMNS))


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None and numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class EvalResult:
    """Per-layer metrics of several lenses over a corpus (see :func:`lenskit.evaluation.evaluate`).

    Attributes:
        metrics: One row per lens and block input (``layer`` 0..n_layers-1), then one
            reference row for the model's own output (``lens="model"``, ``layer=n_layers``);
            columns :data:`COLUMNS`. Layers a lens does not cover are NaN.
        model: The model's name.
        lenses: Per lens name: ``kind``, ``source`` (a path, or None) and ``objective``
            (what the lens was fitted for: every lens's KL to the model's output is
            reported, also for lenses not trained to lower it, such as the J-lens).
        source: Where the text came from.
        tokens: Tokens read by the model (``chunks * seq_len``).
        scored_tokens: Positions scored: all but the last of each chunk, which has no next
            token inside the chunk (``chunks * (seq_len - 1)``). Every metric is averaged
            over the same positions.
        chunks: Chunks evaluated, the unit of the standard errors.
        seq_len: Tokens per chunk.
        n_bytes: Estimated UTF-8 bytes of the chunks' text (0: unknown, per-byte columns NaN).
        seed: Seed of the document order (and of the chunks drawn from given chunks).
        seconds: Wall time of the evaluation.
        transfer: For tuned lenses when asked: mean KL (bits) of translator ``i`` applied to
            the residual at ``layer`` ``j``; columns :data:`TRANSFER_COLUMNS`.
        notes: Per lens name, what to keep in mind reading its rows.
    """

    metrics: pd.DataFrame
    model: str
    lenses: dict[str, dict[str, Any]]
    source: str
    tokens: int
    scored_tokens: int
    chunks: int
    seq_len: int
    n_bytes: int
    seed: int
    seconds: float
    transfer: pd.DataFrame | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.metrics.columns]
        if missing:
            raise ValueError(f"metrics lacks columns {missing}")
        if self.metrics.duplicated(["lens", "layer"]).any():
            raise ValueError("metrics has several rows for one (lens, layer)")
        names = set(self.metrics["lens"])
        if names != {*self.lenses, "model"}:
            raise ValueError(f"metrics lenses {sorted(names)} differ from {sorted(self.lenses)}")
        if self.chunks < 1 or self.seq_len < 2 or self.n_bytes < 0 or self.seconds < 0:
            raise ValueError("need chunks >= 1, seq_len >= 2, n_bytes >= 0 and seconds >= 0")
        if self.tokens != self.chunks * self.seq_len:
            raise ValueError("tokens must be chunks * seq_len")
        if self.scored_tokens != self.chunks * (self.seq_len - 1):
            raise ValueError("scored_tokens must be chunks * (seq_len - 1)")
        if self.transfer is not None:
            absent = [c for c in TRANSFER_COLUMNS if c not in self.transfer.columns]
            if absent:
                raise ValueError(f"transfer lacks columns {absent}")
            if not set(self.transfer["lens"]) <= set(self.lenses):
                raise ValueError("transfer names a lens that is not in lenses")

    @property
    def tokens_per_s(self) -> float:
        """Tokens read per second of evaluation."""
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def attrs(self) -> dict[str, Any]:
        """The provenance of the numbers (what :meth:`to_frame` puts in ``attrs``)."""
        import lenskit

        return {
            "model": self.model,
            "lens": list(self.lenses),
            "lenses": self.lenses,
            "prompt": self.source,
            "source": self.source,
            "tokens": self.tokens,
            "scored_tokens": self.scored_tokens,
            "chunks": self.chunks,
            "seq_len": self.seq_len,
            "n_bytes": self.n_bytes,
            "seed": self.seed,
            "se_unit": SE_UNIT,
            "notes": dict(self.notes),
            "lenskit_version": lenskit.__version__,
        }

    def to_frame(self) -> pd.DataFrame:
        """The metrics table (a copy), provenance in ``attrs``; plot it with ``metric_lines``."""
        frame = self.metrics.copy()
        frame.attrs = self.attrs()
        return frame

    def transfer_matrix(self, lens: str) -> pd.DataFrame:
        """Mean KL (bits): rows are translators ``i``, columns the layers ``j`` they read."""
        if self.transfer is None or lens not in set(self.transfer["lens"]):
            have = [] if self.transfer is None else sorted(set(self.transfer["lens"]))
            raise KeyError(f"no transfer matrix for {lens!r} (have {have})")
        rows = self.transfer[self.transfer["lens"] == lens]
        return rows.pivot(index="translator", columns="layer", values="kl_bits")

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data (NaN as null): provenance, then the numbers."""
        out = {
            **self.attrs(),
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "metrics": self.metrics.to_dict(orient="records"),
            "transfer": None if self.transfer is None else self.transfer.to_dict(orient="records"),
        }
        del out["prompt"], out["lens"]
        return json_safe(out)
