"""The closed-form start of a tuned lens: a ridge regression per layer.

What the final norm sees before its gain and bias (:func:`normalized_target`) is regressed
on ``[h_layer, 1]`` from running float64 ``X^T X`` and ``X^T Y`` (:class:`NormalEquations`),
``d_model^2`` work per token instead of ``d_model * d_vocab``; the translator is
``(c W - I, c b)``, rescaled to the layer. A lens with ``resid_mid`` rows regresses the
same target on ``[h_mid, 1]`` for each of them too (see :mod:`lenskit.training.rows`).

Example:
    >>> import lenskit
    >>> from lenskit.training.closed_form import fit_closed_form
    >>> model = lenskit.load_model("tiny-llama")
    >>> tokens = torch.randint(0, model.cfg.d_vocab, (2, 16))
    >>> len(fit_closed_form(model, tokens).translators) == model.cfg.n_layers
    True
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.lenses.tuned import TunedLens
from lenskit.models import ModelAdapter
from lenskit.residual import capture, row_capture_points
from lenskit.training.rows import stack_rows, train_rows, translators

__all__ = ["NormalEquations", "fit_closed_form", "normalized_target", "set_translators"]


def normalized_target(
    adapter: ModelAdapter, h: Float[Tensor, "*batch d_model"]
) -> Float[Tensor, "*batch d_model"]:
    """What the final norm sees before its gain and bias: ``h/rms(h)``, or standardised ``h``."""
    eps = float(getattr(adapter.model.cfg, "eps", 1e-5))
    x = h.double()
    if adapter.spec.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class NormalEquations:
    """Running ``X^T X`` and ``X^T Y`` (float64) of ``X = [h_layer, 1]`` per layer."""

    def __init__(self, n_layers: int, d_model: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(
            n_layers, d_model + 1, d_model + 1, dtype=torch.float64, device=device
        )
        self.xty = torch.zeros(n_layers, d_model + 1, d_model, dtype=torch.float64, device=device)

    def batch(
        self, rows: Float[Tensor, "layer cell d_model"], target: Float[Tensor, "cell d_model"]
    ) -> tuple[Tensor, Tensor]:
        """One batch's contribution (add it with :meth:`add`)."""
        xa = torch.cat([rows.double(), rows.new_ones(*rows.shape[:2], 1, dtype=torch.float64)], -1)
        return xa.mT @ xa, xa.mT @ target.double()

    def add(self, xtx: Tensor, xty: Tensor) -> None:
        """Add a batch's statistics."""
        self.xtx += xtx
        self.xty += xty

    def solve(self, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
        """Translator weights ``c W - I`` (``[layer, d, d]``, Linear layout) and biases ``c b``.

        ``[W, b]`` is the regression's solution. The final norm ignores the scale of its
        input, so the map is multiplied by ``c = max(rms(h_layer), 1)``: the translated
        residual keeps the layer's scale, and ``c W - I`` does not cancel to about ``-I``
        (which float16 files would store poorly).
        """
        d = self.xty.shape[-1]
        weights, biases = [], []
        for xtx, xty in zip(self.xtx, self.xty, strict=True):
            a = xtx.clone()
            a.diagonal()[:d] += ridge * a.diagonal()[:d].mean()
            sol, info = torch.linalg.solve_ex(a, xty)
            if ridge == 0 or int(info) != 0 or not bool(torch.isfinite(sol).all()):
                sol = torch.linalg.pinv(a, hermitian=True) @ xty  # the minimum-norm solution
            c = (xtx.diagonal()[:d].mean() / xtx[d, d].clamp_min(1)).sqrt().clamp_min(1.0)
            weights.append(c * sol[:d].T - torch.eye(d, dtype=sol.dtype, device=sol.device))
            biases.append(c * sol[d])
        return torch.stack(weights), torch.stack(biases)


def set_translators(lens: TunedLens, weights: Tensor, biases: Tensor) -> None:
    """Copy ``[row, d, d]`` weights and ``[row, d]`` biases into the translators.

    Rows are in the order of :func:`~lenskit.training.rows.train_rows` (block inputs
    only, for a lens without ``resid_mid`` rows).
    """
    with torch.no_grad():
        for translator, w, b in zip(translators(lens), weights, biases, strict=True):
            translator.weight.copy_(w)
            translator.bias.copy_(b)


def fit_closed_form(
    model: Any,
    tokens: Int[Tensor, "chunk pos"],
    *,
    ridge: float = 0.0,
    batch_size: int = 4,
    points: tuple[str, ...] = ("resid_pre",),
) -> TunedLens:
    """The closed-form (least-squares) tuned lens fitted on ``tokens``, in float32.

    ``points=("resid_pre", "resid_mid")`` also fits the ``L12.mid`` rows' translators.
    """
    adapter = ModelAdapter(model)
    lens = TunedLens(adapter, dtype=torch.float32, points=points)
    rows = train_rows(lens)
    normal = NormalEquations(len(rows), adapter.d_model, adapter.W_U.device)
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(adapter.W_U.device)
        cap = capture(model, batch, points=row_capture_points(rows), logits=False)
        target = normalized_target(adapter, cap.final.flatten(0, 1))
        normal.add(*normal.batch(stack_rows(cap, rows), target))
    set_translators(lens, *normal.solve(ridge))
    return lens
