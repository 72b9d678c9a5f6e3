"""Residual streams from TransformerLens hook points, in one forward pass.

Hooks are added inside ``model.hooks(...)``, a context manager that removes
exactly the hooks it added when it exits, on success or on error.

Points (per block ``i``):

- ``resid_pre``: the input of block ``i`` (the stream lenses read by default);
- ``resid_mid``: the stream between attention and MLP;
- ``attn_out`` / ``mlp_out``: the attention and MLP outputs added to the stream;
- ``resid_post``: the output of block ``i``.

Lens rows (:class:`~lenskit.models.Row`) are block inputs, optionally the stream
between attention and MLP (``L12.mid``; 2 rows per block), then the final residual:
``ModelAdapter.rows(("resid_pre", "resid_mid"))`` lists them in stream order,
:func:`row_capture_points` says which points to capture for them, and
:meth:`ResidualCapture.row_stack` stacks the captured rows in that order.

Example:
    >>> import lenskit
    >>> from lenskit.residual import capture
    >>> model = lenskit.load_model("tiny-llama")
    >>> cap = capture(model, model.to_tokens("a b c"), points=("resid_pre", "mlp_out"))
    >>> cap.stack("resid_pre").shape[0] == model.cfg.n_layers
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.models import model_lock
from lenskit.typing import Hidden, LayerHidden, Logits, TokenIds

__all__ = [
    "POINTS",
    "ResidualCapture",
    "capture",
    "hook_names",
    "residual_stack",
    "row_capture_points",
    "token_texts",
    "tokenize",
]

POINTS = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post")
_HOOK = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}


def hook_names(n_layers: int, point: str) -> list[str]:
    """Hook names of one residual point for every block."""
    if point not in _HOOK:
        raise LenskitError(f"unknown residual point {point!r}: use one of {', '.join(POINTS)}")
    return [f"blocks.{i}.{_HOOK[point]}" for i in range(n_layers)]


@dataclass(frozen=True)
class ResidualCapture:
    """Activations captured in one forward pass.

    Attributes:
        tokens: The input token ids.
        logits: The model's own output logits (None if the pass stopped at the final
            residual, see ``capture(..., logits=False)``).
        points: For each requested point, a stack over blocks.
        final: The model's final residual (output of the last block).
    """

    tokens: TokenIds
    logits: Logits | None
    points: dict[str, LayerHidden] = field(repr=False)
    final: Hidden = field(repr=False)

    def stack(self, point: str = "resid_pre") -> LayerHidden:
        """Block-by-block stack of one point."""
        if point not in self.points:
            raise LenskitError(
                f"point {point!r} was not captured: pass points=({point!r}, ...) to capture"
            )
        return self.points[point]

    def row_stack(self, rows: Sequence[Any]) -> LayerHidden:
        """The residual at each :class:`~lenskit.models.Row`, stacked in the order given."""
        return torch.stack(
            [
                self.final if row.point == "resid_post" else self.stack(row.point)[row.layer]
                for row in rows
            ]
        )

    def lens_rows(self) -> LayerHidden:
        """Rows a lens reads: every block input, then the final residual."""
        return torch.cat([self.stack("resid_pre"), self.final.unsqueeze(0)], dim=0)


def row_capture_points(rows: Sequence[Any]) -> tuple[str, ...]:
    """The points :func:`capture` needs for these rows (the final residual comes always)."""
    return tuple(dict.fromkeys(row.point for row in rows if row.point != "resid_post"))


def tokenize(model: Any, prompt: str | Sequence[int] | Tensor) -> TokenIds:
    """Tokenize a prompt the way the model does (with its BOS token), checking its length.

    Args:
        model: A ``TransformerBridge``.
        prompt: Text, or token ids (a list or a 1-D / ``[1, pos]`` tensor).

    Returns:
        ``[1, pos]`` token ids on the model's device.
    """
    n_ctx = int(model.cfg.n_ctx)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise LenskitError("the prompt is empty: give some text")
        tokens = model.to_tokens(prompt, truncate=False)
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long)
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2 or tokens.shape[-1] == 0:
            raise LenskitError("token ids must be a non-empty [pos] or [batch, pos] sequence")
        tokens = tokens.to(model.cfg.device)
    if tokens.shape[-1] > n_ctx:
        raise LenskitError(
            f"the prompt is {tokens.shape[-1]} tokens, longer than the model's context of "
            f"{n_ctx}: shorten it"
        )
    return tokens


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``'s kind, or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class _FinalResidualReached(Exception):
    """Raised by the final-residual hook to end a forward pass early."""


def capture(
    model: Any,
    tokens: TokenIds,
    *,
    points: Sequence[str] = ("resid_pre",),
    logits: bool = True,
    autocast: torch.dtype | None = None,
) -> ResidualCapture:
    """Run the model once and capture residual points of every block.

    Args:
        model: A ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids.
        points: Which points to capture (see :data:`POINTS`).
        logits: Also run the final norm and unembedding. With False the pass stops at
            the final residual, which saves the ``d_model x d_vocab`` matmul per token.
        autocast: Run the model's matmuls in this dtype (``torch.autocast``; training's
            bfloat16 forward passes). The captured activations keep the model's dtype.

    Returns:
        The captured activations, detached, and the model's logits.
    """
    n_layers = int(model.cfg.n_layers)
    store: dict[str, Tensor] = {}
    dtype = None if autocast is None else next(model.parameters()).dtype
    final_name = f"blocks.{n_layers - 1}.hook_resid_post"

    def saver(name: str) -> Any:
        def save(activation: Tensor, hook: Any) -> None:
            store[name] = activation.detach() if dtype is None else activation.detach().to(dtype)
            if name == final_name and not logits:
                raise _FinalResidualReached

        return save

    wanted = {name for point in points for name in hook_names(n_layers, point)} | {final_name}
    output = None
    hooks = [(n, saver(n)) for n in sorted(wanted)]
    with (
        model_lock(model),
        torch.no_grad(),
        model.hooks(fwd_hooks=hooks),
        contextlib.suppress(_FinalResidualReached),
        _autocast(tokens.device, autocast),
    ):
        output = model(tokens).detach()
    if output is not None and dtype is not None:
        output = output.to(dtype)
    stacks = {
        point: torch.stack([store[name] for name in hook_names(n_layers, point)])
        for point in points
    }
    return ResidualCapture(tokens=tokens, logits=output, points=stacks, final=store[final_name])


def residual_stack(model: Any, tokens: TokenIds) -> tuple[LayerHidden, Logits]:
    """Every block input and the final residual, plus the model's logits, in one pass."""
    cap = capture(model, tokens)
    return cap.lens_rows(), cap.logits


def token_texts(tokenizer: Any, ids: Tensor) -> list[Any]:
    """Each token id decoded on its own, as a nested list shaped like ``ids``.

    Ids below zero (a placeholder for "no token") decode to ``""``. Every distinct id
    is decoded once, in one batch call.
    """
    unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    texts = [
        "" if i < 0 else text
        for i, text in zip(
            unique.tolist(),
            tokenizer.batch_decode([[max(i, 0)] for i in unique.tolist()]),
            strict=True,
        )
    ]
    grid = np.empty(len(texts), dtype=object)
    grid[:] = texts
    out = grid[inverse.reshape(ids.shape).numpy()]
    return out.tolist() if isinstance(out, np.ndarray) else out
