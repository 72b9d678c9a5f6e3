"""Layer-by-layer trajectories of a prompt's next-token predictions through a lens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens
from lenskit.metrics import LN2, Reference, row_stats
from lenskit.residual import capture, tokenize

__all__ = ["Trajectory", "resolve_target", "trajectory"]

_ROWS_PER_READOUT = 512  # rows per unembedding matmul: large enough to run near peak


def _tile(reference: Reference, times: int) -> Reference:
    if times == 1:
        return reference
    return Reference(
        probs=reference.probs.repeat(times, 1), neg_entropy=reference.neg_entropy.repeat(times)
    )


@dataclass(frozen=True)
class Trajectory:
    """A prompt's predictions at every lens row and position; information in bits.

    Rows are the block inputs ``0..n_layers-1`` and then the model's own output.
    Cross-entropy is of the actual next token (NaN at the last position); rows the
    lens does not cover are NaN and ``covered`` is False there.

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

    def __post_init__(self) -> None:
        n_layer, n_pos = self.entropy.shape
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
        """One row per (layer, position) cell, long-form; top-k as list columns."""
        n_layer, n_pos = self.entropy.shape
        records = []
        for row in range(n_layer):
            for pos in range(n_pos):
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
        frame.attrs.update(model=self.model_name, lens=self.lens_kind, prompt=self.prompt,
                           target=self.target)
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


def trajectory(
    model: Any,
    lens: Lens,
    prompt: str | Tensor,
    *,
    target: str | int | None = None,
    top_k: int = 10,
) -> Trajectory:
    """Read a prompt's next-token prediction at every layer through a lens.

    Args:
        model: A ``TransformerBridge``.
        lens: A lens built for this model (see :func:`lenskit.get_lens`).
        prompt: Text (tokenized with the model's BOS token) or token ids.
        target: A token (text or id) whose probability and rank to follow.
        top_k: How many top tokens to keep per cell.

    Returns:
        The :class:`Trajectory`.
    """
    adapter = lens.adapter
    if adapter.model is not model:
        raise LenskitError(
            f"this {lens.kind} lens was built for another model object: build it with "
            "get_lens(kind, model) for this model"
        )
    if not 1 <= top_k <= adapter.d_vocab:
        raise LenskitError(f"top_k must be in 1..{adapter.d_vocab}, got {top_k}")
    target_text, target_id = (None, None)
    if target is not None:
        target_text, target_id = resolve_target(model.tokenizer, target)
    tokens = tokenize(model, prompt)
    if tokens.shape[0] != 1:
        raise LenskitError("trajectory reads one prompt at a time: pass a single sequence")

    cap = capture(model, tokens)
    rows = cap.lens_rows()[:, 0]  # [layer, pos, d_model]
    n_rows, n_pos = rows.shape[0], rows.shape[1]
    next_ids = torch.cat([tokens[0, 1:], tokens[0, -1:]])  # the last one is masked below
    ids = next_ids.unsqueeze(-1)
    if target_id is not None:
        ids = torch.cat([ids, torch.full_like(ids, target_id)], dim=-1)

    nan = torch.full((n_rows, n_pos), math.nan)
    entropy, kl, ce, tprob = nan.clone(), nan.clone(), nan.clone(), nan.clone()
    trank = torch.full((n_rows, n_pos), -1, dtype=torch.long)
    top_ids = torch.zeros((n_rows, n_pos, top_k), dtype=torch.long)
    top_probs = nan.clone().unsqueeze(-1).repeat(1, 1, top_k)
    covered = torch.tensor([lens.covers(r) for r in range(n_rows)])
    reference = Reference.from_logits(cap.logits[0])
    with torch.no_grad():
        # The output row is the model's own prediction; lens rows go through the
        # readout a few layers at a time, so each matmul streams W_U once for many rows.
        done = [r for r in range(n_rows) if covered[r] and r != adapter.n_layers]
        group = max(1, _ROWS_PER_READOUT // n_pos)
        blocks = [done[i : i + group] for i in range(0, len(done), group)]
        if covered[adapter.n_layers]:
            blocks.append([adapter.n_layers])
        for block in blocks:
            if block == [adapter.n_layers]:
                logits = cap.logits[0].unsqueeze(0)
            else:
                hidden = torch.stack([lens.transform_hidden(rows[r], r) for r in block])
                logits = adapter.readout(hidden)
            stats = row_stats(
                logits.reshape(-1, logits.shape[-1]),
                _tile(reference, len(block)),
                ids.repeat(len(block), 1),
                top_k=top_k,
                rank_columns=0 if target_id is None else 1,
            )
            idx = torch.tensor(block)
            entropy[idx] = stats.entropy.view(len(block), n_pos)
            kl[idx] = stats.kl.view(len(block), n_pos)
            ce[idx] = -stats.id_log_probs[:, 0].view(len(block), n_pos) / LN2
            top_ids[idx] = stats.top_ids.view(len(block), n_pos, top_k)
            top_probs[idx] = stats.top_probs.view(len(block), n_pos, top_k)
            if target_id is not None:
                tprob[idx] = stats.id_log_probs[:, 1].exp().view(len(block), n_pos)
                trank[idx] = stats.id_ranks[:, 1].view(len(block), n_pos)
    ce[:, -1] = math.nan
    decode = model.tokenizer.decode
    vocab_text: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in vocab_text:
            vocab_text[i] = decode([i])
        return vocab_text[i]

    top_tokens = tuple(
        tuple(tuple(text(i) for i in cell) for cell in layer) for layer in top_ids.tolist()
    )
    return Trajectory(
        model_name=adapter.name,
        lens_kind=lens.kind,
        prompt=prompt if isinstance(prompt, str) else f"<{n_pos} token ids>",
        token_ids=tokens[0].cpu(),
        tokens=tuple(text(i) for i in tokens[0].tolist()),
        layer_labels=tuple(adapter.row_label(r) for r in range(n_rows)),
        covered=covered,
        top_ids=top_ids,
        top_probs=top_probs,
        top_tokens=top_tokens,
        entropy=entropy,
        kl_to_final=kl,
        cross_entropy=ce,
        target=target_text,
        target_id=target_id,
        target_prob=tprob if target_id is not None else None,
        target_rank=trank if target_id is not None else None,
    )
