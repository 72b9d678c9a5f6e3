"""Layer-by-layer trajectories of a prompt's next-token predictions through a lens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenskit.cells import Cells
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens, row_blocks
from lenskit.metrics import LN2, Reference, row_stats
from lenskit.residual import capture, token_texts, tokenize

__all__ = ["Trajectory", "TrajectoryBuilder", "prompt_tokens", "resolve_target", "trajectory"]

_CELLS_PER_READOUT = 512  # cells per unembedding matmul: large enough to run near peak


@dataclass(frozen=True)
class Trajectory:
    """A prompt's predictions at every lens row and position; information in bits.

    Rows are the block inputs ``0..n_layers-1`` and then the model's own output.
    Cross-entropy is of the actual next token (NaN at the last position); rows the
    lens does not cover are NaN and ``covered`` is False there. A trajectory computed
    for some rows or positions only (``cells``) is NaN outside them.

    Attributes:
        model_name: The model's name.
        lens_kind: The lens kind.
        prompt: The prompt text (or a description of the token ids).
        token_ids: Input token ids.
        tokens: Input tokens as text.
        layer_labels: One label per row (``L0`` ... and ``output``).
        covered: Whether the lens reads each row.
        top_ids: Top-k token ids per row and position.
        top_probs: Their probabilities.
        top_tokens: Their text, nested ``[layer][pos][k]``.
        entropy: Entropy of the lens distribution.
        kl_to_final: ``KL(model output || lens)``.
        cross_entropy: ``-log2 q(next token)``.
        target: The target token's text, if one was given.
        target_id: Its id.
        target_prob: Its probability per row and position.
        target_rank: Its zero-based rank (0 = top-1).
        cells: The rows and positions computed (None: all of them).
    """

    model_name: str
    lens_kind: str
    prompt: str
    token_ids: Int[Tensor, " pos"]
    tokens: tuple[str, ...]
    layer_labels: tuple[str, ...]
    covered: Bool[Tensor, " layer"]
    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    top_tokens: tuple[tuple[tuple[str, ...], ...], ...] = field(repr=False)
    entropy: Float[Tensor, "layer pos"] = field(repr=False)
    kl_to_final: Float[Tensor, "layer pos"] = field(repr=False)
    cross_entropy: Float[Tensor, "layer pos"] = field(repr=False)
    target: str | None = None
    target_id: int | None = None
    target_prob: Float[Tensor, "layer pos"] | None = field(default=None, repr=False)
    target_rank: Int[Tensor, "layer pos"] | None = field(default=None, repr=False)
    cells: Cells | None = None

    def __post_init__(self) -> None:
        n_layer, n_pos = self.entropy.shape
        if self.cells is None:
            object.__setattr__(self, "cells", Cells.select(n_layer, n_pos))
        elif not self.cells.fits(n_layer, n_pos):
            raise ValueError(f"trajectory cells {self.cells} lie outside {n_layer}x{n_pos}")
        if len(self.tokens) != n_pos or len(self.layer_labels) != n_layer:
            raise ValueError(
                f"trajectory has {n_layer}x{n_pos} cells but {len(self.layer_labels)} layer "
                f"labels and {len(self.tokens)} tokens"
            )
        for name in ("kl_to_final", "cross_entropy", "top_probs", "top_ids"):
            if tuple(getattr(self, name).shape[:2]) != (n_layer, n_pos):
                raise ValueError(f"trajectory field {name} does not match {n_layer}x{n_pos}")
        if (self.target_prob is None) != (self.target_id is None):
            raise ValueError("target_prob and target_id must be given together")

    @property
    def n_layers(self) -> int:
        """Number of rows (block inputs plus the output row)."""
        return len(self.layer_labels)

    @property
    def next_tokens(self) -> tuple[str | None, ...]:
        """The actual next token at each position (None at the last)."""
        return (*self.tokens[1:], None)

    def to_frame(self) -> pd.DataFrame:
        """One row per computed (layer, position) cell, long-form; top-k as list columns."""
        records = []
        for row in self.cells.rows:
            for pos in range(self.cells.start, self.cells.stop):
                record: dict[str, Any] = {
                    "layer": row,
                    "layer_label": self.layer_labels[row],
                    "covered": bool(self.covered[row]),
                    "pos": pos,
                    "input_token": self.tokens[pos],
                    "next_token": self.next_tokens[pos],
                    "top1_token": self.top_tokens[row][pos][0],
                    "top1_prob": float(self.top_probs[row, pos, 0]),
                    "entropy_bits": float(self.entropy[row, pos]),
                    "kl_to_final_bits": float(self.kl_to_final[row, pos]),
                    "cross_entropy_bits": float(self.cross_entropy[row, pos]),
                    "topk_tokens": list(self.top_tokens[row][pos]),
                    "topk_probs": [float(p) for p in self.top_probs[row, pos]],
                }
                if self.target_prob is not None and self.target_rank is not None:
                    record["target_prob"] = float(self.target_prob[row, pos])
                    record["target_rank"] = int(self.target_rank[row, pos])
                records.append(record)
        frame = pd.DataFrame.from_records(records)
        frame.attrs.update(
            model=self.model_name, lens=self.lens_kind, prompt=self.prompt, target=self.target
        )
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary: metadata and one record per cell (NaN as None)."""
        cells = self.to_frame().astype(object).where(lambda f: f.notna(), None)
        return {
            "model": self.model_name,
            "lens": self.lens_kind,
            "prompt": self.prompt,
            "target": self.target,
            "target_id": self.target_id,
            "units": "bits",
            "layers": list(self.layer_labels),
            "tokens": list(self.tokens),
            "cells": [_clean(r) for r in cells.to_dict(orient="records")],
        }


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out


def resolve_target(tokenizer: Any, target: str | int) -> tuple[str, int]:
    """Turn a target token (text or id) into ``(text, id)``; it must be exactly one token."""
    vocab = len(tokenizer)
    if isinstance(target, int):
        if not 0 <= target < vocab:
            raise LenskitError(f"target id {target} is outside the vocabulary: use 0..{vocab - 1}")
        return tokenizer.decode([target]), target
    if not isinstance(target, str) or target == "":
        raise LenskitError("the target is empty: give one token, such as ' Paris'")
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise LenskitError(
            f"target {target!r} is {len(ids)} tokens {pieces}, not one: give a single token "
            "(mind the leading space, e.g. ' Paris')"
        )
    return target, int(ids[0])


class TrajectoryBuilder:
    """Fills a :class:`Trajectory` row by row from logits computed elsewhere.

    :func:`trajectory` reads rows through one lens; :func:`lenskit.comparison.compare`
    shares each block of readouts between several lenses and their divergence.

    Args:
        model: The ``TransformerBridge``.
        lens: The lens whose rows are added.
        tokens: ``[1, pos]`` prompt tokens.
        final_logits: The model's own logits at every position.
        target: ``(text, id)`` of a target token, or None.
        top_k: Top tokens kept per cell.
        cells: The rows and positions to compute (None: all).
    """

    def __init__(
        self,
        model: Any,
        lens: Lens,
        tokens: Int[Tensor, "1 pos"],
        final_logits: Float[Tensor, "pos d_vocab"],
        target: tuple[str, int] | None,
        top_k: int,
        cells: Cells | None = None,
    ) -> None:
        adapter = lens.adapter
        lens.check_model(model)
        if not 1 <= top_k <= adapter.d_vocab:
            raise LenskitError(f"top_k must be in 1..{adapter.d_vocab}, got {top_k}")
        n_rows, n_pos = adapter.n_rows, tokens.shape[-1]
        self.cells = cells or Cells.select(n_rows, n_pos)
        self.model, self.lens, self.tokens, self.target, self.top_k = (
            model,
            lens,
            tokens,
            target,
            top_k,
        )
        window = slice(self.cells.start, self.cells.stop)
        next_ids = torch.cat([tokens[0, 1:], tokens[0, -1:]])  # the last one is masked
        self.ids = next_ids[window].unsqueeze(-1)
        if target is not None:
            self.ids = torch.cat([self.ids, torch.full_like(self.ids, target[1])], dim=-1)
        nan = torch.full((n_rows, n_pos), math.nan)
        self.entropy, self.kl, self.ce, self.tprob = (nan.clone() for _ in range(4))
        self.trank = torch.full((n_rows, n_pos), -1, dtype=torch.long)
        self.top_ids = torch.full((n_rows, n_pos, top_k), -1, dtype=torch.long)
        self.top_probs = nan.clone().unsqueeze(-1).repeat(1, 1, top_k)
        self.covered = torch.tensor([lens.covers(r) for r in range(n_rows)])
        self.final_logits = final_logits[window]
        self.reference = Reference.from_logits(self.final_logits)

    def lens_rows(self) -> list[int]:
        """Rows to read through the lens: covered, chosen, and not the model's output."""
        out = self.lens.adapter.n_layers
        return [r for r in self.cells.rows if self.covered[r] and r != out]

    def add(self, row: int, logits: Float[Tensor, "pos d_vocab"]) -> None:
        """Statistics of one row from its logits at the chosen positions."""
        stats = row_stats(
            logits,
            self.reference,
            self.ids,
            top_k=self.top_k,
            rank_columns=0 if self.target is None else 1,
        )
        window = slice(self.cells.start, self.cells.stop)
        self.entropy[row, window] = stats.entropy
        self.kl[row, window] = stats.kl
        self.ce[row, window] = -stats.id_log_probs[:, 0] / LN2
        self.top_ids[row, window] = stats.top_ids
        self.top_probs[row, window] = stats.top_probs
        if self.target is not None:
            self.tprob[row, window] = stats.id_log_probs[:, 1].exp()
            self.trank[row, window] = stats.id_ranks[:, 1]

    def finish(self, prompt: str | Tensor) -> Trajectory:
        """The trajectory; the model's output row is added here if chosen and covered."""
        adapter = self.lens.adapter
        out = adapter.n_layers
        if self.covered[out] and out in self.cells.rows:
            self.add(out, self.final_logits)
        self.ce[:, -1] = math.nan
        tokenizer = self.model.tokenizer
        top_tokens = tuple(
            tuple(tuple(cell) for cell in layer) for layer in token_texts(tokenizer, self.top_ids)
        )
        n_pos = self.tokens.shape[-1]
        target_id = None if self.target is None else self.target[1]
        return Trajectory(
            model_name=adapter.name,
            lens_kind=self.lens.kind,
            prompt=prompt if isinstance(prompt, str) else f"<{n_pos} token ids>",
            token_ids=self.tokens[0].cpu(),
            tokens=tuple(token_texts(tokenizer, self.tokens[0])),
            layer_labels=tuple(adapter.row_label(r) for r in range(adapter.n_rows)),
            covered=self.covered,
            top_ids=self.top_ids,
            top_probs=self.top_probs,
            top_tokens=top_tokens,
            entropy=self.entropy,
            kl_to_final=self.kl,
            cross_entropy=self.ce,
            target=None if self.target is None else self.target[0],
            target_id=target_id,
            target_prob=self.tprob if target_id is not None else None,
            target_rank=self.trank if target_id is not None else None,
            cells=self.cells,
        )


def prompt_tokens(model: Any, prompt: str | Tensor) -> Int[Tensor, "1 pos"]:
    """The prompt's ``[1, pos]`` tokens, refusing a batch of several prompts."""
    tokens = tokenize(model, prompt)
    if tokens.shape[0] != 1:
        raise LenskitError("lenses read one prompt at a time: pass a single sequence")
    return tokens


def trajectory(
    model: Any,
    lens: Lens,
    prompt: str | Tensor,
    *,
    target: str | int | None = None,
    top_k: int = 10,
    rows: Sequence[int] | None = None,
    positions: tuple[int, int] | None = None,
) -> Trajectory:
    """Read a prompt's next-token prediction at every layer through a lens.

    Args:
        model: A ``TransformerBridge``.
        lens: A lens built for this model (see :func:`lenskit.get_lens`).
        prompt: Text (tokenized with the model's BOS token) or token ids.
        target: A token (text or id) whose probability and rank to follow.
        top_k: How many top tokens to keep per cell.
        rows: Compute only these rows (block inputs ``0..n_layers-1``, ``n_layers``
            for the output); None for all. The others are NaN.
        positions: Compute only positions ``start..stop-1``; None for all.

    Returns:
        The :class:`Trajectory`.
    """
    lens.check_model(model)  # before the forward pass
    resolved = None if target is None else resolve_target(model.tokenizer, target)
    tokens = prompt_tokens(model, prompt)
    cells = Cells.select(lens.adapter.n_rows, tokens.shape[-1], rows, positions)
    cap = capture(model, tokens)
    builder = TrajectoryBuilder(model, lens, tokens, cap.logits[0], resolved, top_k, cells)
    hidden = cap.lens_rows()[:, 0, cells.start : cells.stop]  # [layer, pos, d_model]
    with torch.no_grad():
        # A few rows per readout, so each matmul streams W_U once for many cells.
        for block in row_blocks(builder.lens_rows(), cells.n_pos, _CELLS_PER_READOUT):
            for row, logits in zip(block, lens.read_rows(hidden[block], block), strict=True):
                builder.add(row, logits)
    return builder.finish(prompt)
