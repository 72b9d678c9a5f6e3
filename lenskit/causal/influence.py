"""How much one residual direction matters: ablate it, measure the KL of the output, in bits.

Ablating unit direction ``v`` at token ``t`` replaces the residual's coordinate along ``v``
with a reference value: ``h' = h - ((h - r) . v) v``, where ``r`` is the mean residual
(``mean`` ablation), zero (``zero``), or the residual of another token, drawn by a seeded
permutation without fixed points (``resample``). A direction's influence on a lens is the
mean over tokens of ``KL(lens(h) || lens(h'))``; on the model, of ``KL(model(x) || model(x
with h' at the layer))``, with the ablation done in the model's own residual stream through
a TransformerLens hook.

:class:`LensObjective` is the lens influence as a differentiable function of ``v`` over a
fixed set of residuals, for the optimizer. For a lens whose map to the final norm is affine
(logit, tuned) and a readout of the form ``norm -> linear`` it runs a fast path: the ablated
normalised residual is ``beta + alpha_t (y_t - beta) + gamma_t q`` for two numbers per token
(found exactly by the model's own norm and a 2x2 solve), so the ablated logits are a
combination of cached clean logits and one vector, with no ``[tokens, d_model, d_vocab]``
product per step. It checks that decomposition on every call and on a sample against the
plain path at the start, and falls back to the plain path (the lens itself on the ablated
residuals) where it does not hold. Reported influences always use the plain path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.causal.config import ABLATIONS
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens
from lenskit.lenses.basis import CausalBasis
from lenskit.metrics import LN2, Reference, kl_nats
from lenskit.models import model_lock
from lenskit.readout import Readout

__all__ = [
    "ABLATIONS",
    "LensObjective",
    "ablate",
    "ablation_reference",
    "direction_logits",
    "direction_tokens",
    "lens_influence",
    "model_influence",
]

ROWS = 512  # rows per readout in the plain path
BLOCK = 16  # rows per block in the fast path: a block's passes stay in the CPU cache
SPAN_TOL = 1e-4  # largest relative error allowed in the fast path's decomposition


def ablation_reference(
    h: Float[Tensor, "cell d_model"], ablation: str, mean: Float[Tensor, " d_model"], *, seed: int
) -> Float[Tensor, "cell d_model"]:
    """The reference residual of each token for an ablation (see the module docs)."""
    if ablation == "mean":
        return mean.to(h).expand_as(h).clone()
    if ablation == "zero":
        return torch.zeros_like(h)
    if ablation == "resample":
        if h.shape[0] < 2:
            raise LenskitError("resample ablation needs at least two tokens: use more data")
        order = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(seed))
        source = torch.empty_like(order)
        source[order] = order.roll(-1)  # each token takes the next one's in a random cycle
        return h[source.to(h.device)].clone()
    raise LenskitError(f"unknown ablation {ablation!r}: use one of {', '.join(ABLATIONS)}")


def ablate(
    h: Float[Tensor, "*batch d_model"],
    v: Float[Tensor, " d_model"],
    reference: Float[Tensor, "*batch d_model"],
) -> Float[Tensor, "*batch d_model"]:
    """``h - ((h - reference) . v) v``: the coordinate along unit ``v`` set to the reference's."""
    coef = ((h - reference) * v).sum(-1, keepdim=True)
    return h - coef * v


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


def lens_influence(
    lens: Lens,
    layer: int,
    h: Float[Tensor, "cell d_model"],
    reference: Float[Tensor, "cell d_model"],
    directions: Float[Tensor, "k d_model"],
    *,
    precision: str = "exact",
) -> Float[Tensor, " k"]:
    """Each direction's influence on a lens, in bits: the lens itself on the ablated residuals.

    A lens that reads its translated residual through the model's final norm and
    unembedding (every built-in kind) is read by :class:`lenskit.readout.Readout` at
    ``precision`` (float32 by default: single-direction KLs are small); any other lens
    through its own ``forward``.

    Returns:
        Mean ``KL(lens(h) || lens(ablate(h, v)))`` per direction (float64).
    """
    layer = lens.check_layer(layer)
    sums = torch.zeros(directions.shape[0], dtype=torch.float64)
    straight = type(lens).forward is Lens.forward  # translate, then the model's readout
    engine = Readout(lens.adapter, precision) if straight else None
    with torch.no_grad():
        for lo in range(0, h.shape[0], ROWS):
            part, ref_part = h[lo : lo + ROWS], reference[lo : lo + ROWS]
            if engine is None:
                clean = Reference.from_logits(lens(part, layer))
            else:
                clean = engine.reference(lens.transform_hidden(part, layer))
            for i, v in enumerate(directions.to(h)):
                ablated = ablate(part, v, ref_part)
                if engine is None:
                    kl = kl_nats(clean, lens(ablated, layer))
                else:
                    kl = engine.kl_nats(lens.transform_hidden(ablated, layer), clean)
                sums[i] += kl.double().sum()
    return sums / (h.shape[0] * LN2)


def model_influence(
    model: Any,
    layer: int,
    directions: Float[Tensor, "k d_model"],
    tokens: Int[Tensor, "chunk pos"],
    reference: Float[Tensor, "chunk pos d_model"],
    *,
    skip_first: int = 1,
    batch_size: int = 4,
    clean: list[Reference] | None = None,
    progress: bool = False,
) -> Float[Tensor, " k"]:
    """Each direction's influence on the model: ablated at ``blocks.{layer}.hook_resid_pre``.

    The direction is ablated at every position from ``skip_first`` on, and the KL between
    the model's clean and ablated output is averaged over those positions.

    Args:
        model: A ``TransformerBridge``.
        layer: The block whose input is ablated (``0 <= layer < n_layers``).
        directions: Unit directions.
        tokens: Token chunks.
        reference: The reference residual of each token (positions before ``skip_first``
            are not used).
        skip_first: Leading positions of each chunk left alone and unscored.
        batch_size: Chunks per forward pass.
        clean: The model's clean output distribution per batch (scored positions,
            flattened), if already computed.
        progress: Show a tqdm bar.

    Returns:
        Mean KL in bits per direction (float64).
    """
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer < n_layers:
        raise LenskitError(f"layer {layer} has no block input to ablate: use 0..{n_layers - 1}")
    if not 0 <= skip_first < tokens.shape[1]:
        raise LenskitError(f"skip_first must be in 0..{tokens.shape[1] - 1}, got {skip_first}")
    from tqdm.auto import tqdm

    name = f"blocks.{layer}.hook_resid_pre"
    starts = list(range(0, tokens.shape[0], batch_size))
    sums = torch.zeros(directions.shape[0], dtype=torch.float64)
    bar = tqdm(
        total=len(starts) * directions.shape[0],
        desc=f"model influence L{layer}",
        unit="pass",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    with torch.no_grad(), bar:
        for b, start in enumerate(starts):
            batch = tokens[start : start + batch_size]
            ref = reference[start : start + batch_size, skip_first:]
            if clean is not None:
                base = clean[b]
            else:
                with model_lock(model):
                    base = Reference.from_logits(model(batch)[:, skip_first:].flatten(0, 1))
            for i, v in enumerate(directions):

                def ablate_hook(act: Tensor, hook: Any, v: Tensor = v, ref: Tensor = ref) -> Tensor:
                    out = act.clone()
                    out[:, skip_first:] = ablate(act[:, skip_first:], v.to(act), ref.to(act))
                    return out

                with model_lock(model), model.hooks(fwd_hooks=[(name, ablate_hook)]):
                    logits = model(batch)
                sums[i] += kl_nats(base, logits[:, skip_first:].flatten(0, 1)).double().sum()
                bar.update(1)
    return sums / (tokens.shape[0] * (tokens.shape[1] - skip_first) * LN2)


def direction_logits(
    lens: Lens, layer: int, directions: Float[Tensor, "k d_model"], at: Float[Tensor, " d_model"]
) -> Float[Tensor, "k d_vocab"]:
    """How a step along each direction moves the lens's logits at residual ``at``.

    The lens's Jacobian at ``at`` applied to each direction (translator, final norm and
    unembedding, linearised), centred over the vocabulary (softmax ignores a shift).
    """
    layer = lens.check_layer(layer)

    def read(h: Tensor) -> Tensor:
        return lens(h.unsqueeze(0), layer)[0]

    rows = []
    for v in directions.to(at):
        _, tangent = torch.autograd.functional.jvp(read, (at.detach(),), (v,))
        rows.append(tangent - tangent.mean())
    return torch.stack(rows).detach()


def direction_tokens(
    lens: Lens,
    basis: CausalBasis,
    tokenizer: Any,
    *,
    top: int = 8,
) -> pd.DataFrame:
    """The tokens each direction of a basis promotes and suppresses through the lens.

    Args:
        lens: The lens the basis was extracted for.
        basis: The causal basis.
        tokenizer: The model's tokenizer (to decode token ids).
        top: Tokens per side.

    Returns:
        One row per (direction, side, rank): ``direction`` (1-based), ``side``
        (``promotes`` / ``suppresses``), ``rank``, ``token_id``, ``token`` and
        ``logit_change`` (per unit step along the direction at the mean residual).
    """
    effect = direction_logits(lens, basis.layer, basis.basis, basis.mean)
    if not 1 <= top <= effect.shape[1] // 2:
        raise LenskitError(f"top must be in 1..{effect.shape[1] // 2}, got {top}")
    records = []
    for i, row in enumerate(effect):
        for side, sign in (("promotes", 1.0), ("suppresses", -1.0)):
            values, ids = torch.topk(sign * row, top)
            for rank, (value, tid) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
                records.append(
                    {
                        "direction": i + 1,
                        "side": side,
                        "rank": rank + 1,
                        "token_id": tid,
                        "token": tokenizer.decode([tid]),
                        "logit_change": sign * value,
                    }
                )
    frame = pd.DataFrame.from_records(records)
    frame.attrs.update(layer=basis.layer, lens=lens.kind, model=lens.adapter.name)
    return frame
