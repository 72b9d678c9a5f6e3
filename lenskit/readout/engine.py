"""The readout engine: residual rows -> final norm -> unembedding -> statistics.

:class:`Readout` reads residuals through the model's own final norm and unembedding, a
block of rows per matmul, in the precision chosen (:mod:`lenskit.readout.precision`).
In a low precision the few residual coordinates that carry most of a block's rounding
error are corrected inside the same matmul (see :meth:`Readout.unembed`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.metrics import Reference
from lenskit.models import model_lock
from lenskit.readout.precision import LOWP, fp32_matmuls, lowp_mm, resolve_precision
from lenskit.readout.stats import STATS_ROWS, RowStats, concat_stats, kl_block, logit_stats

__all__ = ["CORRECTED_DIMS", "MATMUL_ROWS", "Readout"]

MATMUL_ROWS = 512
"""Rows per unembedding matmul: enough to run near peak; 512 x 49k float32 logits are 100 MB."""
CORRECTED_DIMS = 16
"""Residual coordinates per block whose low-precision rounding is corrected in float32."""
_CORRECTION_SLOTS = 24  # coordinates the cached weights correct: a block's 16 and spares
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Weights:
    """The unembedding extended by the rounding corrections of some residual coordinates.

    ``aug`` is ``[W_U; hi[dims]; lo[dims]; b_hi; b_lo]`` (rows; bias rows only if the
    bias is nonzero), where ``hi`` is ``W_U`` rounded to the low precision and ``lo =
    W_U - hi``; ``low`` is ``aug`` in the low precision (None where the matmul takes
    float32 weights).
    """

    version: int
    dims: tuple[int, ...]
    aug: Tensor
    low: Tensor | None
    bias: bool


class Readout:
    """Final norm and unembedding of one model, and the fused statistics of its logits.

    Args:
        adapter: The model's adapter (a lens's ``lens.adapter``).
        precision: ``"exact"``, ``"bf16"``, ``"fp16"``, ``"auto"`` or None
            (``$LENSKIT_PRECISION``, else ``"auto"``); see :mod:`lenskit.readout`.
    """

    def __init__(self, adapter: Any, precision: str | None = None) -> None:
        self.adapter = adapter
        self.device = adapter.W_U.device
        self.precision = resolve_precision(precision, self.device)
        self.dtype = LOWP.get(self.precision, torch.float32)
        self._switched = (
            self.dtype == torch.bfloat16
            and self.device.type == "cpu"
            and torch.backends.mkldnn.is_available()
        )

    def __repr__(self) -> str:
        return f"Readout(model={self.adapter.name!r}, precision={self.precision!r})"

    def _row_norm(self) -> Tensor:
        """``||W_U[k]||`` per residual coordinate (cached with the weights)."""
        w = self.adapter.W_U
        cache = self.adapter.model.__dict__.setdefault("_lenskit_readout_weights", {})
        key = ("row_norm", str(w.device), w.data_ptr())
        found = cache.get(key)
        if found is None or found[0] != w._version:
            with torch.no_grad():
                found = cache[key] = (w._version, w.detach().float().norm(dim=1))
        return found[1]

    def _weights(self, want: list[int]) -> _Weights:
        """The cached extended weights, rebuilt if they do not correct all of ``want``."""
        w = self.adapter.W_U
        cache = self.adapter.model.__dict__.setdefault("_lenskit_readout_weights", {})
        key = (self.precision, str(w.device), w.data_ptr())
        with _BUILD_LOCK:
            prep = cache.get(key)
            if prep is not None and prep.version == w._version and set(want) <= set(prep.dims):
                return prep
            spare = [] if prep is None or prep.version != w._version else prep.dims
            dims = tuple(dict.fromkeys([*want, *spare]))[:_CORRECTION_SLOTS]
            cache[key] = prep = self._build(dims)
            return prep

    def _build(self, dims: tuple[int, ...]) -> _Weights:
        with torch.no_grad():
            w = self.adapter.W_U.detach().float()
            b = self.adapter.b_U.detach().float()
            index = torch.tensor(dims, dtype=torch.long, device=w.device)
            rows = w[index]
            hi = rows.to(self.dtype).float()
            parts = [w, hi, rows - hi]
            bias = bool(b.any())
            if bias:
                b_hi = b.to(self.dtype).float()
                parts += [b_hi[None], (b - b_hi)[None]]
            aug = torch.cat(parts).contiguous()
            low = None if self._switched else aug.to(self.dtype)
            return _Weights(w._version, dims, aug, low, bias)

    def unembed(self, x: Float[Tensor, "cell d_model"]) -> Float[Tensor, "cell d_vocab"]:
        """``x @ W_U + b_U`` and the model's output transform, for normalised rows ``x``.

        In a low precision, rows are extended by the corrections of the block's
        :data:`CORRECTED_DIMS` coordinates with the largest ``|x_k| * ||W_U[k]||`` (the
        same few across tokens carry most of the rounding error): ``x_lo @ W_hi + x_hi @
        W_lo`` for those ``k``, and the bias as ``b_hi + b_lo``, all in the one matmul.
        """
        adapter = self.adapter
        if self.precision == "exact":
            with fp32_matmuls():
                return adapter.unembed(x).float()
        x = x.float()
        if not x.shape[0]:
            return x.new_zeros(0, adapter.d_vocab)
        want = (x.abs().amax(0) * self._row_norm()).topk(min(CORRECTED_DIMS, x.shape[1])).indices
        prep = self._weights(want.tolist())
        x_hi = x.to(self.dtype).float()
        index = torch.tensor(prep.dims, dtype=torch.long, device=x.device)
        cols = [x, (x - x_hi)[:, index], x_hi[:, index]]
        if prep.bias:
            cols.append(x.new_ones(x.shape[0], 2))
        x_aug = torch.cat(cols, 1)
        lock = model_lock(adapter.model) if self._switched else contextlib.nullcontext()
        with lock:
            z = lowp_mm(x_aug, prep.aug, prep.low, self.dtype)
        return adapter.model.adapter.apply_output_logits_transform(z).float()

    def logits(self, h: Float[Tensor, "*cell d_model"]) -> Float[Tensor, "*cell d_vocab"]:
        """Float32 logits of residuals ``h`` through the final norm and unembedding."""
        lead = h.shape[:-1]
        flat = h.reshape(-1, h.shape[-1])
        with torch.no_grad():
            parts = [
                self.unembed(self.adapter.final_norm(flat[i : i + MATMUL_ROWS]))
                for i in range(0, flat.shape[0], MATMUL_ROWS)
            ]
        if len(parts) == 1:
            out = parts[0]  # no copy of a 100 MB block
        else:
            out = torch.cat(parts) if parts else flat.new_zeros(0, self.adapter.d_vocab)
        return out.reshape(*lead, out.shape[-1])

    def reference_logits(
        self, h_final: Float[Tensor, "*cell d_model"]
    ) -> Float[Tensor, "*cell d_vocab"]:
        """The model's own logits from its final residual, in float32 whatever the precision.

        ``p`` is what every lens is measured against, and it is one row of many.
        """
        exact = self if self.precision == "exact" else Readout(self.adapter, "exact")
        return exact.logits(h_final)

    def reference(self, h_final: Float[Tensor, "cell d_model"]) -> Reference:
        """The model's output distribution ``p`` from its final residual, for KL."""
        return Reference.from_logits(self.reference_logits(h_final))

    def stats(
        self,
        logits: Float[Tensor, "cell d_vocab"],
        reference: Reference | None,
        ids: Int[Tensor, "cell target"],
        *,
        top_k: int,
        rank_columns: int = 0,
    ) -> RowStats:
        """:func:`~lenskit.readout.logit_stats` of logits already read."""
        return logit_stats(logits, reference, ids, top_k=top_k, rank_columns=rank_columns)

    def read_stats(
        self,
        h: Float[Tensor, "cell d_model"],
        reference: Reference | None,
        ids: Int[Tensor, "cell target"],
        *,
        top_k: int,
        rank_columns: int = 0,
    ) -> RowStats:
        """Read residual rows and take their statistics, one matmul block at a time."""
        parts = []
        for i in range(0, h.shape[0], MATMUL_ROWS):
            part = slice(i, i + MATMUL_ROWS)
            ref = None if reference is None else _ref_slice(reference, part)
            parts.append(
                self.stats(
                    self.logits(h[part]), ref, ids[part], top_k=top_k, rank_columns=rank_columns
                )
            )
        return concat_stats(parts)

    def kl_nats(
        self, h: Float[Tensor, "cell d_model"], reference: Reference
    ) -> Float[Tensor, " cell"]:
        """``KL(p || q)`` in nats of the lens rows ``h`` (not differentiable)."""
        out = []
        for i in range(0, h.shape[0], MATMUL_ROWS):
            part = slice(i, i + MATMUL_ROWS)
            logits, ref = self.logits(h[part]), _ref_slice(reference, part)
            for j in range(0, logits.shape[0], STATS_ROWS):
                sub = slice(j, j + STATS_ROWS)
                out.append(kl_block(logits[sub], ref.probs[sub], ref.neg_entropy[sub]))
        return torch.cat(out) if out else h.new_zeros(0)


def _ref_slice(reference: Reference, part: slice) -> Reference:
    return Reference(reference.probs[part], reference.neg_entropy[part])
