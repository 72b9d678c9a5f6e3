"""The readout engine: residual rows -> final norm -> unembedding -> statistics.

:class:`Readout` reads residuals through the model's own final norm and unembedding, a
block of rows per matmul, in the precision chosen (:mod:`lenskit.readout.precision`).
Where the low-precision matmul rounds its output (CPUs), each row's most likely tokens
are read again exactly (see :meth:`Readout.unembed`). The ``[rows, d_vocab]`` outputs of
a block can go into per-thread buffers that are reused (``scratch=``,
:mod:`lenskit.readout.scratch`). :meth:`Readout.read_stats` goes straight from residuals
to statistics: the rounded block is read once, a cache-sized chunk at a time, with each
chunk's head made exact on the way, and many rows that share a reference are read
together so that the reference stays in the CPU cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.metrics import Reference
from lenskit.readout.fused import FUSED_MIN_ROWS, fused_ready, fused_stats, worth_compiling
from lenskit.readout.heads import EXACT_HEAD, REFERENCE_HEAD, ReadLogits, head_ids
from lenskit.readout.precision import LOWP, lowp_mm, resolve_precision
from lenskit.readout.scratch import MATMUL_ROWS, scratch_buffer
from lenskit.readout.stats import (
    STATS_ROWS,
    RowStats,
    kl_block,
    logit_stats,
    top_k,
)

_top_k = top_k  # read_stats's keyword argument top_k hides the function

__all__ = [
    "EXACT_HEAD",
    "MATMUL_ROWS",
    "REFERENCE_HEAD",
    "ReadLogits",
    "Readout",
    "head_ids",
    "scratch_buffer",
]


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
        self._plain: bool | None = None

    def __repr__(self) -> str:
        return f"Readout(model={self.adapter.name!r}, precision={self.precision!r})"

    def _cached(self, name: str, make: Callable[[], Any]) -> Any:
        """A value derived from ``W_U`` / ``b_U``, cached on the model until ``W_U`` changes."""
        w = self.adapter.W_U
        cache = self.adapter.model.__dict__.setdefault("_lenskit_readout_weights", {})
        key = (name, str(w.device), w.data_ptr())
        found = cache.get(key)
        if found is None or found[0] != w._version:
            with torch.no_grad():
                found = cache[key] = (w._version, make())
        return found[1]

    def _head_logits(
        self, x: Float[Tensor, "cell d_model"], ids: Int[Tensor, "cell head"], bias: bool = True
    ) -> Float[Tensor, "cell head"]:
        """Float32 logits ``x @ W_U[:, ids] + b_U[ids]`` of a few tokens per row."""
        wt = self._cached("transposed", lambda: self.adapter.W_U.detach().float().T.contiguous())
        # index_select into a reused buffer and a product-sum: 4x and 2x faster than
        # wt[ids] and bmm, and no page faults on a fresh 28 MB tensor per block
        flat = ids.reshape(-1)
        out = self._out(3, flat.shape[0], torch.float32, wt.shape[1])
        rows = torch.index_select(wt, 0, flat, out=out) if out is not None else wt[flat]
        head = rows.view(*ids.shape, -1).mul_(x.float().unsqueeze(1)).sum(-1)
        return head + self.adapter.b_U.detach().float()[ids] if bias else head

    def _exact_head(
        self, x: Tensor, z: Tensor, exact: Int[Tensor, "cell head"] | None
    ) -> tuple[Tensor, Tensor]:
        """Float32 logits ``z`` with each row's head recomputed exactly, in place.

        The head is the row's :data:`EXACT_HEAD` most likely tokens by the rounded logits
        and the tokens of ``exact`` (the reference's most likely, say): where almost all
        the probability lies, so that top-k, log-sum-exp, entropy and KL are exact there
        and only the tail carries the matmul's rounding. Returns ``z`` and the row's
        own most likely tokens (its top-k :attr:`ReadLogits.candidates`).
        """
        own = ids = top_k(z, min(EXACT_HEAD, z.shape[-1]))[1]
        if exact is not None:
            ids = torch.cat([ids, exact.to(ids.device)], 1)
        return z.scatter_(1, ids, self._head_logits(x, ids)), own

    def _out(
        self, slot: int | None, rows: int, dtype: torch.dtype, cols: int | None = None
    ) -> Tensor | None:
        if slot is None or self.device.type != "cpu":  # CUDA's allocator caches already
            return None
        return scratch_buffer(slot, rows, cols or self.adapter.d_vocab, dtype, self.device)

    def unembed(
        self,
        x: Float[Tensor, "cell d_model"],
        exact: Int[Tensor, "cell head"] | None = None,
        *,
        scratch: int | None = None,
    ) -> ReadLogits:
        """``x @ W_U + b_U`` and the model's output transform, for normalised rows ``x``.

        In a low precision the matmul's inputs are rounded (sums stay float32). Where its
        output is rounded too (the fast CPU path), each row's head is recomputed in
        float32 (:meth:`_exact_head`), with the tokens ``exact`` names, and returned as
        the rows' top-k candidates.

        Args:
            x: Normalised residual rows (at most :data:`MATMUL_ROWS` with ``scratch``).
            exact: Token ids per row whose logits must be exact in a low precision.
            scratch: Write into this thread's reusable buffer number ``scratch``: the
                result is valid only until the next call with the same slot.
        """
        adapter, rows = self.adapter, x.shape[0]
        w, b = adapter.W_U, adapter.b_U
        if rows > MATMUL_ROWS and scratch is not None:
            raise ValueError(f"scratch holds {MATMUL_ROWS} rows, got {rows}")
        transform = adapter.model.adapter.apply_output_logits_transform
        if self.precision == "exact":
            out = self._out(scratch, rows, torch.float32)
            z = torch.addmm(b, x, w) if out is None else torch.addmm(b, x, w, out=out)
            return ReadLogits(transform(z).float(), None)
        x = x.float()
        w_low = self._cached(self.precision, lambda: w.detach().to(self.dtype).contiguous())
        z = lowp_mm(x, w_low, self.dtype, out=self._out(scratch, rows, self.dtype))
        if z.dtype != torch.float32:
            out = self._out(scratch, rows, torch.float32)
            z = z.float() if out is None else out.copy_(z)
        if self._cached("bias", lambda: bool(b.detach().any())):
            z += b.detach().float()
        z, own = self._exact_head(x, z, exact)
        out = transform(z)
        # The candidates keep their place through an output transform that keeps the
        # order of logits (a soft cap, a positive scale), the only kinds models use.
        return ReadLogits(out.float(), own)

    def logits(
        self,
        h: Float[Tensor, "*cell d_model"],
        exact: Int[Tensor, "*cell head"] | None = None,
        *,
        scratch: int | None = None,
    ) -> Float[Tensor, "*cell d_vocab"]:
        """Float32 logits of residuals ``h`` through the final norm and unembedding.

        See :meth:`read` for the arguments.
        """
        return self.read(h, exact, scratch=scratch).logits

    def read(
        self,
        h: Float[Tensor, "*cell d_model"],
        exact: Int[Tensor, "*cell head"] | None = None,
        *,
        scratch: int | None = None,
    ) -> ReadLogits:
        """Float32 logits of residuals ``h``, and each row's top-k candidates if known.

        Pass :attr:`ReadLogits.candidates` on to :func:`~lenskit.readout.logit_stats`
        (``candidates=``) so that its top-k need not search the whole vocabulary.

        Args:
            h: Residual rows.
            exact: Token ids per row whose logits must be exact in a low precision
                (the reference's head, for KL; see :meth:`unembed`).
            scratch: Reuse this thread's output buffer number ``scratch`` (at most
                :data:`MATMUL_ROWS` rows; valid until the next call with that slot).
        """
        lead = h.shape[:-1]
        flat = h.reshape(-1, h.shape[-1])
        ids = None if exact is None else exact.reshape(flat.shape[0], -1)
        with torch.no_grad():
            parts = [
                self.unembed(
                    self.adapter.final_norm(flat[i : i + MATMUL_ROWS]),
                    None if ids is None else ids[i : i + MATMUL_ROWS],
                    scratch=scratch,
                )
                for i in range(0, flat.shape[0], MATMUL_ROWS)
            ]
        if not parts:
            return ReadLogits(flat.new_zeros(*lead, self.adapter.d_vocab), None)
        if len(parts) == 1:
            out, cand = parts[0]  # no copy of a 100 MB block
        else:
            out = torch.cat([p.logits for p in parts])
            cand = None if parts[0].candidates is None else torch.cat([p.candidates for p in parts])
        return ReadLogits(
            out.reshape(*lead, out.shape[-1]),
            None if cand is None else cand.reshape(*lead, cand.shape[-1]),
        )

    def reference_logits(
        self, h_final: Float[Tensor, "*cell d_model"], *, scratch: int | None = None
    ) -> Float[Tensor, "*cell d_vocab"]:
        """The model's own logits from its final residual, in float32 whatever the precision.

        ``p`` is what every lens is measured against, and it is one row of many.
        ``scratch``: as in :meth:`read`.
        """
        exact = self if self.precision == "exact" else Readout(self.adapter, "exact")
        return exact.logits(h_final, scratch=scratch)

    def reference(self, h_final: Float[Tensor, "cell d_model"]) -> Reference:
        """The model's output distribution ``p`` from its final residual, for KL."""
        return Reference.from_logits(self.reference_logits(h_final))

    def read_stats(
        self,
        h: Float[Tensor, "*group cell d_model"],
        reference: Reference | None,
        ids: Int[Tensor, "cell target"],
        *,
        top_k: int,
        rank_columns: int = 0,
        head: Int[Tensor, "cell head"] | None = None,
        progress: Callable[[float], None] | None = None,
        compiled: bool | None = None,
    ) -> RowStats:
        """Read residual rows and take their statistics, without keeping their logits.

        ``h`` may hold groups of rows (several layers or lenses) at the same cells: all
        share the ``reference``, ``ids`` and ``head`` of those cells. Each matmul block
        takes a few cells of many groups, so that the reference rows those cells need
        stay in the CPU cache while every group is compared with them. In a low
        precision, the rounded logits are read once by the statistics with their exact
        head written over them (:func:`~lenskit.readout.logit_stats`'s ``exact_head``), with
        no float32 copy of the block.

        Args:
            h: Residual rows, ``[*group, cell, d_model]``.
            reference: The model's distribution at the cells (None: KL is NaN).
            ids: Token ids per cell whose log-probabilities (and ranks) to report.
            top_k: How many top tokens to keep.
            rank_columns: Rank only the last ``rank_columns`` columns of ``ids``.
            head: Token ids per cell to read exactly in a low precision; default the
                reference's :data:`REFERENCE_HEAD` most likely.
            progress: Called with the fraction done after each matmul block.
            compiled: Take a low-precision read's statistics in one compiled pass per
                block (:mod:`lenskit.readout.fused`; same results, where it compiles).
                None: for reads of at least :data:`~lenskit.readout.fused.FUSED_MIN_ROWS`
                rows once the kernel has compiled in this process.

        Returns:
            Statistics shaped ``[*group, cell, ...]``.
        """
        lead, d = h.shape[:-2], h.shape[-1]
        n_cells = h.shape[-2]
        rows = h.reshape(-1, n_cells, d)  # [group, cell, d_model]
        n_groups = rows.shape[0]
        if head is None and reference is not None:
            head = head_ids(reference.probs)
        # cells per block: a multiple of STATS_ROWS, so that groups x cells fill a matmul
        per_block = max(STATS_ROWS, MATMUL_ROWS // max(1, n_groups) // STATS_ROWS * STATS_ROWS)
        per_block = min(per_block, max(1, n_cells))
        groups_per_block = max(1, MATMUL_ROWS // per_block)
        if compiled is None:
            compiled = n_groups * n_cells >= FUSED_MIN_ROWS and worth_compiling(0.0)
        compiled = compiled and fused_ready(self.device, self.adapter.d_vocab)
        out: list[Tensor] | None = None
        done, total = 0, n_groups * n_cells
        for c0 in range(0, n_cells, per_block):
            cells = slice(c0, c0 + per_block)
            ref = None if reference is None else _ref_slice(reference, cells)
            n = rows[:, cells].shape[1]
            for g0 in range(0, n_groups, groups_per_block):
                block = rows[g0 : g0 + groups_per_block, cells]  # [g, cell, d_model]
                g = block.shape[0]
                stats = self._block_stats(
                    block.reshape(g * n, d),
                    ref,
                    ids[cells].repeat(g, 1),
                    None if head is None else head[cells].repeat(g, 1),
                    top_k=top_k,
                    rank_columns=rank_columns,
                    compiled=compiled,
                )
                fields = [getattr(stats, f.name) for f in dataclasses.fields(RowStats)]
                if out is None:
                    out = [f.new_empty(n_groups, n_cells, *f.shape[1:]) for f in fields]
                for dst, src in zip(out, fields, strict=True):
                    dst[g0 : g0 + g, cells] = src.view(g, n, *src.shape[1:])
                done += g * n
                if progress is not None:
                    progress(done / total)
        if out is None:  # no cells or no groups
            empty = logit_stats(h.new_zeros(0, self.adapter.d_vocab), None, ids[:0], top_k=top_k)
            out = [getattr(empty, f.name) for f in dataclasses.fields(RowStats)]
            return RowStats(*(f.reshape(*lead, n_cells, *f.shape[1:]) for f in out))
        return RowStats(*(f.reshape(*lead, *f.shape[1:]) for f in out))

    def _block_stats(
        self,
        h: Float[Tensor, "cell d_model"],
        reference: Reference | None,
        ids: Int[Tensor, "cell target"],
        head: Int[Tensor, "cell head"] | None,
        *,
        top_k: int,
        rank_columns: int,
        compiled: bool = False,
    ) -> RowStats:
        """Statistics of at most :data:`MATMUL_ROWS` rows; ``reference`` may cycle."""
        with torch.no_grad():
            x = self.adapter.final_norm(h)
            if self.precision == "exact" or not self._plain_output():
                logits, cand = self.unembed(x, head, scratch=0)
                return logit_stats(
                    logits,
                    reference,
                    ids,
                    top_k=top_k,
                    rank_columns=rank_columns,
                    candidates=cand,
                )
            w_low = self._cached(
                self.precision, lambda: self.adapter.W_U.detach().to(self.dtype).contiguous()
            )
            z = lowp_mm(x.float(), w_low, self.dtype, out=self._out(0, x.shape[0], self.dtype))
            n_own = min(max(EXACT_HEAD, top_k), z.shape[-1])  # holds the top-k asked
            if compiled:
                stats = fused_stats(
                    z,
                    reference,
                    ids,
                    head,
                    lambda at: self._head_logits(x, at, bias=False),
                    top_k=top_k,
                    own=n_own,
                    rank_columns=rank_columns,
                )
                if stats is not None:
                    return stats

            def exact_head(rows: slice, zc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                # the chunk's own head found in its float32 copy, in the CPU cache; the
                # requested tokens are read exactly too (their log-probs and ranks)
                own = _top_k(zc, n_own)[1]
                parts = [own, ids[rows]] if head is None else [own, head[rows], ids[rows]]
                exact = torch.cat([t.to(own.device) for t in parts], 1)
                return own, exact, self._head_logits(x[rows], exact, bias=False)

            return logit_stats(
                z,
                reference,
                ids,
                top_k=top_k,
                rank_columns=rank_columns,
                exact_head=exact_head,
            )

    def _plain_output(self) -> bool:
        """Whether the logits are ``x @ W_U`` as they are: no bias, no output transform."""
        if self._plain is None:
            probe = torch.zeros(1, 2, device=self.device)
            transform = self.adapter.model.adapter.apply_output_logits_transform
            self._plain = transform(probe) is probe and not bool(self.adapter.b_U.detach().any())
        return self._plain

    def kl_nats(
        self, h: Float[Tensor, "cell d_model"], reference: Reference
    ) -> Float[Tensor, " cell"]:
        """``KL(p || q)`` in nats of the lens rows ``h`` (not differentiable)."""
        out = []
        for i in range(0, h.shape[0], MATMUL_ROWS):
            part = slice(i, i + MATMUL_ROWS)
            ref = _ref_slice(reference, part)
            logits = self.logits(h[part], head_ids(ref.probs), scratch=0)
            for j in range(0, logits.shape[0], STATS_ROWS):
                sub = slice(j, j + STATS_ROWS)
                out.append(kl_block(logits[sub], ref.probs[sub], ref.neg_entropy[sub]))
        return torch.cat(out) if out else h.new_zeros(0)


def _ref_slice(reference: Reference, part: slice) -> Reference:
    return Reference(reference.probs[part], reference.neg_entropy[part])
