"""The lens influence of a direction as a differentiable function, for the optimizer.

:class:`LensObjective` is the mean ``KL(lens(h) || lens(ablate(h, v)))`` in bits over a
fixed set of residuals, as a function of the unit direction ``v``. For a lens whose map to
the final norm is affine (logit, tuned) and a readout of the form ``norm -> linear`` it runs
a fast path: the ablated normalised residual is ``beta + alpha_t (y_t - beta) + gamma_t q``
for two numbers per token (found exactly by the model's own norm and a 2x2 solve), so the
ablated logits are a combination of cached clean logits and one vector, with no
``[tokens, d_model, d_vocab]`` product per step. It checks that decomposition on every call
and on a sample against the plain path at the start, and falls back to the plain path (the
lens itself on the ablated residuals) where it does not hold. Reported influences always
use the plain path (:func:`lenskit.causal.influence.lens_influence`).

Example:
    >>> import torch, lenskit
    >>> from lenskit.causal.objective import LensObjective
    >>> model = lenskit.load_model("tiny-llama")
    >>> lens = lenskit.get_lens("logit", model)
    >>> h = torch.randn(8, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    >>> objective = LensObjective(lens, 1, h, torch.zeros_like(h))
    >>> v = torch.zeros(model.cfg.d_model)
    >>> v[0] = 1.0
    >>> from lenskit.causal.influence import lens_influence
    >>> plain = lens_influence(lens, 1, h, torch.zeros_like(h), v[None])
    >>> abs(float(objective(v)) - float(plain[0])) < 1e-4
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.causal.ablation import ROWS, ablate
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens
from lenskit.metrics import LN2, Reference, kl_nats

__all__ = ["BLOCK", "SPAN_TOL", "LensObjective"]

BLOCK = 16  # rows per block in the fast path: a block's passes stay in the CPU cache
SPAN_TOL = 1e-4  # largest relative error allowed in the fast path's decomposition


class _FromGradient(torch.autograd.Function):
    """A scalar whose value and gradients were computed together, outside autograd."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[..., Any], *inputs: Tensor) -> Tensor:
        value, grads = compute(*(x.detach() for x in inputs))
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        return (None, *(grad * g for g in ctx.saved_tensors))


class LensObjective:
    """Mean ``KL(lens(h) || lens(ablate(h, v)))`` in bits over fixed residuals, as a function of v.

    Args:
        lens: The lens.
        layer: The lens row the residuals come from.
        h: Residuals, one row per token.
        reference: Their reference residuals (see :func:`ablation_reference`).
        mode: ``"auto"`` (the fast path where it fits), ``"fast"`` or ``"exact"`` (the lens
            itself on every call).
        check: In ``auto`` mode, compare the fast path with the exact one on a sample first.
    """

    def __init__(
        self,
        lens: Lens,
        layer: int,
        h: Float[Tensor, "cell d_model"],
        reference: Float[Tensor, "cell d_model"],
        *,
        mode: str = "auto",
        check: bool = True,
    ) -> None:
        if mode not in ("auto", "fast", "exact"):
            raise ValueError(f"mode must be auto, fast or exact, got {mode!r}")
        self.lens, self.layer = lens, lens.check_layer(layer)
        self.h, self.reference = h.detach().float(), reference.detach().float()
        self.n = h.shape[0]
        self.fallbacks = 0  # fast-path calls that fell back to the exact path
        self.calls = 0
        adapter = lens.adapter
        with torch.no_grad():
            y = torch.cat(
                [
                    adapter.final_norm(lens.transform_hidden(self.h[lo : lo + ROWS], layer))
                    for lo in range(0, self.n, ROWS)
                ]
            )
            raw = torch.cat(
                [y[lo : lo + ROWS] @ adapter.W_U + adapter.b_U for lo in range(0, self.n, ROWS)]
            )
            sample = slice(0, min(self.n, 16))
            linear = torch.allclose(lens(self.h[sample], layer), raw[sample], rtol=1e-5, atol=1e-5)
            logits = (
                raw
                if linear
                else torch.cat(
                    [lens(self.h[lo : lo + ROWS], layer) for lo in range(0, self.n, ROWS)]
                )
            )
            parts = [Reference.from_logits(logits[lo : lo + ROWS]) for lo in range(0, self.n, ROWS)]
            self.clean = Reference(
                torch.cat([r.probs for r in parts]), torch.cat([r.neg_entropy for r in parts])
            )
        del logits
        self.mode = "exact"
        if mode != "exact" and linear:
            self._prepare_fast(y, raw)
            self.mode = "fast"
            if mode == "auto" and check and not self._fast_matches():
                self.mode = "exact"
        if mode == "fast" and self.mode != "fast":
            raise LenskitError(
                f"the fast objective does not fit the {lens.kind} lens: use mode='exact'"
            )
        if self.mode == "exact":
            for name in ("zc", "a", "pz", "pb"):
                self.__dict__.pop(name, None)

    def _prepare_fast(self, y: Tensor, raw: Tensor) -> None:
        adapter = self.lens.adapter
        with torch.no_grad():
            self.beta = adapter.final_norm(torch.zeros_like(self.h[:1]))[0]
            self.b_tilde = self.beta @ adapter.W_U + adapter.b_U
            self.zc = raw.sub_(self.b_tilde)  # a_t @ W_U, with a_t = y_t - beta
            p = self.clean.probs
            self.pz = torch.cat(
                [
                    (p[i : i + BLOCK] * self.zc[i : i + BLOCK]).sum(-1)
                    for i in range(0, self.n, BLOCK)
                ]
            )
            self.pb = torch.cat(
                [(p[i : i + BLOCK] * self.b_tilde).sum(-1) for i in range(0, self.n, BLOCK)]
            )
            self.a = (y - self.beta).double()

    def _fast_matches(self) -> bool:
        """Whether the fast and exact paths agree on a sample, for two random directions."""
        sample = slice(0, min(self.n, 64))
        args = (self.lens, self.layer, self.h[sample], self.reference[sample])
        fast = LensObjective(*args, mode="fast", check=False)
        exact = LensObjective(*args, mode="exact")
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            v = torch.randn(self.h.shape[1], generator=gen).to(self.h)
            v = v / v.norm()
            with torch.no_grad():
                a, b = float(fast(v)), float(exact(v))
            if fast.fallbacks or not math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6):
                return False
        return True

    def __call__(self, v: Float[Tensor, " d_model"]) -> Float[Tensor, ""]:
        """The influence of unit direction ``v`` in bits, differentiable in ``v``."""
        self.calls += 1
        return self._fast(v) if self.mode == "fast" else self._exact(v)

    def _exact(self, v: Tensor) -> Tensor:
        def compute(v: Tensor) -> tuple[Tensor, tuple[Tensor]]:
            total, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(v)
            for lo in range(0, self.n, ROWS):
                part = slice(lo, lo + ROWS)
                ref = Reference(self.clean.probs[part], self.clean.neg_entropy[part])
                with torch.enable_grad():
                    leaf = v.clone().requires_grad_(True)
                    logits = self.lens(ablate(self.h[part], leaf, self.reference[part]), self.layer)
                    kl = kl_nats(ref, logits).sum()
                    (g,) = torch.autograd.grad(kl, leaf)
                total += float(kl)
                grad += g
            scale = 1.0 / (self.n * LN2)
            return (total * scale).to(v.dtype), (grad * scale,)

        return _FromGradient.apply(compute, v)

    def _fast(self, v: Tensor) -> Tensor:
        adapter, lens, layer = self.lens.adapter, self.lens, self.layer
        ends = lens.transform_hidden(torch.stack([v, torch.zeros_like(v)]), layer)
        q = (adapter.final_norm(ends[0] - ends[1]) - self.beta).double()
        d = (
            adapter.final_norm(lens.transform_hidden(ablate(self.h, v, self.reference), layer))
            - self.beta
        ).double()
        aa, aq, qq = (self.a * self.a).sum(-1), self.a @ q, q @ q
        ad, qd = (self.a * d).sum(-1), d @ q
        det = aa * qq - aq * aq
        alpha = (qq * ad - aq * qd) / det
        gamma = (aa * qd - aq * ad) / det
        with torch.no_grad():
            err = (d - alpha.unsqueeze(-1) * self.a - gamma.unsqueeze(-1) * q).norm(dim=-1)
            fits = bool((err <= SPAN_TOL * d.norm(dim=-1).clamp_min(1e-12)).all())
        if not fits:  # e.g. a direction the translator maps to zero
            self.fallbacks += 1
            return self._exact(v)
        w = q.float() @ adapter.W_U
        return _FromGradient.apply(self._fast_blocks, alpha.float(), gamma.float(), w)

    def _fast_blocks(self, alpha: Tensor, gamma: Tensor, w: Tensor) -> tuple[Tensor, tuple]:
        """Summed KL and its gradients in alpha, gamma and w, block by block.

        Ablated logits are ``b + alpha zc + gamma w``; ``KL = sum p log p + lse - E_p[logits]``
        and its gradient in the logits is ``softmax(logits) - p``. The value's sums over the
        vocabulary are elementwise (accurate to ~1e-7); the gradient's use BLAS products.
        """
        p_all, neg_h, b = self.clean.probs, self.clean.neg_entropy, self.b_tilde
        has_b = bool(b.any())
        total = torch.zeros((), dtype=torch.float64)
        d_alpha, d_gamma = torch.empty_like(alpha), torch.empty_like(gamma)
        d_w = torch.zeros_like(w)
        buf = torch.empty(2, min(BLOCK, self.n), w.shape[0], dtype=w.dtype)
        for lo in range(0, self.n, BLOCK):
            hi = min(lo + BLOCK, self.n)
            logits, tmp = buf[0, : hi - lo], buf[1, : hi - lo]
            zc, p, g = self.zc[lo:hi], p_all[lo:hi], gamma[lo:hi]
            torch.mul(zc, alpha[lo:hi, None], out=logits).addcmul_(g[:, None], w)
            if has_b:
                logits.add_(b)
            top = logits.amax(-1, keepdim=True)
            e_sum = logits.sub_(top).exp_().sum(-1, keepdim=True)
            pw = torch.mul(p, w, out=tmp).sum(-1)
            p_logits = self.pb[lo:hi] + alpha[lo:hi] * self.pz[lo:hi] + g * pw
            lse = top.squeeze(-1) + e_sum.squeeze(-1).log()
            total += float((neg_h[lo:hi] + lse - p_logits).double().sum())
            q = logits.div_(e_sum)
            d_alpha[lo:hi] = torch.bmm(q.unsqueeze(1), zc.unsqueeze(2)).view(-1) - self.pz[lo:hi]
            d_gamma[lo:hi] = q @ w - pw
            d_w.addmv_(q.sub_(p).T, g)
        scale = 1.0 / (self.n * LN2)
        return (total * scale).float(), (d_alpha * scale, d_gamma * scale, d_w * scale)
