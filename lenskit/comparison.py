"""How far two lenses disagree, cell by cell, over one prompt.

:func:`lens_divergence` reads every lens row of a prompt through two lenses and
compares their *full* next-token distributions at each (layer, position) cell:
``KL(a || b)`` and Jensen-Shannon in bits, total variation as a probability.
Rows are numbered as in :class:`lenskit.trajectory.Trajectory`: the block inputs,
then the model's final residual (labelled ``output``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens
from lenskit.metrics import divergences
from lenskit.residual import capture, tokenize

__all__ = ["MEASURES", "LensDivergence", "lens_divergence"]

_CELLS_PER_CHUNK = 512  # positions per lens call: bounds the [chunk, d_vocab] temporaries
MEASURES: dict[str, str] = {
    "kl": "KL(a ‖ b) (bits)",
    "js": "Jensen-Shannon (bits)",
    "tv": "total variation",
}


@dataclass(frozen=True)
class LensDivergence:
    """Per-cell divergence between two lenses' distributions over one prompt.

    Rows are the block inputs ``0..n_layers-1`` and then the model's final
    residual. A row is covered only if both lenses read it; uncovered rows are NaN.

    Attributes:
        model_name: The model's name.
        lens_a: Kind of the first lens (the ``p`` of ``KL(p || q)``).
        lens_b: Kind of the second lens.
        prompt: The prompt text (or a description of the token ids).
        token_ids: Input token ids.
        tokens: Input tokens as text.
        layer_labels: One label per row (``L0`` ... and ``output``).
        covered: Whether both lenses read each row.
        kl: ``KL(a || b)`` in bits.
        js: Jensen-Shannon divergence in bits (between 0 and 1).
        tv: Total variation distance (a probability, between 0 and 1).
        top1_a: The first lens's most likely token per cell, nested ``[layer][pos]``
            (empty strings in uncovered rows).
        top1_b: The second lens's most likely token per cell.
    """

    model_name: str
    lens_a: str
    lens_b: str
    prompt: str
    token_ids: Int[Tensor, " pos"]
    tokens: tuple[str, ...]
    layer_labels: tuple[str, ...]
    covered: Bool[Tensor, " layer"]
    kl: Float[Tensor, "layer pos"] = field(repr=False)
    js: Float[Tensor, "layer pos"] = field(repr=False)
    tv: Float[Tensor, "layer pos"] = field(repr=False)
    top1_a: tuple[tuple[str, ...], ...] = field(repr=False)
    top1_b: tuple[tuple[str, ...], ...] = field(repr=False)

    def __post_init__(self) -> None:
        n_layer, n_pos = self.kl.shape
        if len(self.tokens) != n_pos or len(self.layer_labels) != n_layer:
            raise ValueError(
                f"divergence has {n_layer}x{n_pos} cells but {len(self.layer_labels)} layer "
                f"labels and {len(self.tokens)} tokens"
            )
        for name in ("js", "tv"):
            if tuple(getattr(self, name).shape) != (n_layer, n_pos):
                raise ValueError(f"divergence field {name} does not match {n_layer}x{n_pos}")
        if tuple(self.covered.shape) != (n_layer,) or tuple(self.token_ids.shape) != (n_pos,):
            raise ValueError("divergence covered/token_ids do not match its cells")
        for name in ("top1_a", "top1_b"):
            grid = getattr(self, name)
            if len(grid) != n_layer or any(len(row) != n_pos for row in grid):
                raise ValueError(f"divergence field {name} does not match {n_layer}x{n_pos}")

    @property
    def n_layers(self) -> int:
        """Number of rows (block inputs plus the output row)."""
        return len(self.layer_labels)

    def measure(self, name: str) -> Float[Tensor, "layer pos"]:
        """One measure by name: ``"kl"``, ``"js"`` or ``"tv"``."""
        if name not in MEASURES:
            raise LenskitError(
                f"unknown divergence measure {name!r}: use one of {', '.join(MEASURES)}"
            )
        return getattr(self, name)

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, position) cell, long-form."""
        n_layer, n_pos = self.kl.shape
        layer = torch.arange(n_layer).repeat_interleave(n_pos)
        pos = torch.arange(n_pos).repeat(n_layer)
        frame = pd.DataFrame(
            {
                "layer": layer.numpy(),
                "layer_label": [self.layer_labels[i] for i in layer.tolist()],
                "covered": self.covered[layer].numpy(),
                "pos": pos.numpy(),
                "input_token": [self.tokens[i] for i in pos.tolist()],
                "top1_a": [tok for row in self.top1_a for tok in row],
                "top1_b": [tok for row in self.top1_b for tok in row],
                "kl_bits": self.kl.reshape(-1).double().numpy(),
                "js_bits": self.js.reshape(-1).double().numpy(),
                "tv": self.tv.reshape(-1).double().numpy(),
            }
        )
        frame.attrs.update(
            model=self.model_name,
            lens=f"{self.lens_a} vs {self.lens_b}",
            lens_a=self.lens_a,
            lens_b=self.lens_b,
            prompt=self.prompt,
        )
        return frame


def lens_divergence(
    model: Any,
    lens_a: Lens,
    lens_b: Lens,
    prompt: str | Tensor,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> LensDivergence:
    """Compare two lenses' full next-token distributions at every row and position.

    The model runs once; each covered row is then read through both lenses
    (``lens(hidden, layer)``) a chunk of positions at a time.

    Args:
        model: A ``TransformerBridge``.
        lens_a: The first lens (``p`` in ``KL(p || q)``), built for ``model``.
        lens_b: The second lens, built for ``model``.
        prompt: Text (tokenized with the model's BOS token) or token ids.
        progress: Called as ``progress(done, total)`` after each row, for a
            progress bar.

    Returns:
        The :class:`LensDivergence`.

    Raises:
        LenskitError: If a lens was built for another model or the prompt is bad.
    """
    for lens in (lens_a, lens_b):
        if lens.adapter.model is not model:
            raise LenskitError(
                f"this {lens.kind} lens was built for another model object: build it with "
                "get_lens(kind, model) for this model"
            )
    tokens = tokenize(model, prompt)
    if tokens.shape[0] != 1:
        raise LenskitError("lens_divergence reads one prompt at a time: pass a single sequence")
    adapter = lens_a.adapter
    cap = capture(model, tokens)
    rows = cap.lens_rows()[:, 0]  # [layer, pos, d_model]
    n_rows, n_pos = rows.shape[0], rows.shape[1]
    covered = torch.tensor([lens_a.covers(r) and lens_b.covers(r) for r in range(n_rows)])

    kl = torch.full((n_rows, n_pos), math.nan)
    js, tv = kl.clone(), kl.clone()
    top_a = torch.full((n_rows, n_pos), -1, dtype=torch.long)
    top_b = top_a.clone()
    todo = [r for r in range(n_rows) if covered[r]]
    with torch.no_grad():
        for done, row in enumerate(todo, start=1):
            for start in range(0, n_pos, _CELLS_PER_CHUNK):
                cells = slice(start, start + _CELLS_PER_CHUNK)
                hidden = rows[row, cells]
                logits_a, logits_b = lens_a(hidden, row), lens_b(hidden, row)
                kl_ab, js_ab, tv_ab = divergences(logits_a, logits_b)
                kl[row, cells] = kl_ab.clamp_min(0.0).float()
                js[row, cells] = js_ab.clamp_min(0.0).float()
                tv[row, cells] = tv_ab.float()
                top_a[row, cells] = logits_a.argmax(-1)
                top_b[row, cells] = logits_b.argmax(-1)
            if progress is not None:
                progress(done, len(todo))

    decode = model.tokenizer.decode
    vocab_text: dict[int, str] = {}

    def text(i: int) -> str:
        if i < 0:
            return ""
        if i not in vocab_text:
            vocab_text[i] = decode([i])
        return vocab_text[i]

    def grid(ids: Tensor) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(text(i) for i in row) for row in ids.tolist())

    return LensDivergence(
        model_name=adapter.name,
        lens_a=lens_a.kind,
        lens_b=lens_b.kind,
        prompt=prompt if isinstance(prompt, str) else f"<{n_pos} token ids>",
        token_ids=tokens[0].cpu(),
        tokens=tuple(text(i) for i in tokens[0].tolist()),
        layer_labels=tuple(adapter.row_label(r) for r in range(n_rows)),
        covered=covered,
        kl=kl,
        js=js,
        tv=tv,
        top1_a=grid(top_a),
        top1_b=grid(top_b),
    )
