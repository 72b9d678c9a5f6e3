"""One exact-KL gradient step of a tuned lens, and its optimizer.

:func:`kl_step` accumulates the gradient of ``KL(model output || lens)`` for one batch,
layer by layer and chunk by chunk, with a lean custom backward where the unembedding is
plain ``x @ W_U + b_U``; :func:`make_optimizer` gives per-layer step sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.evaluation.layer_kl import ROWS_PER_READOUT
from lenskit.lenses.tuned import TunedLens
from lenskit.metrics import Reference, kl_nats
from lenskit.models import ModelAdapter
from lenskit.residual import capture

__all__ = ["kl_step", "make_optimizer"]


class _ReadoutLogSumExp(torch.autograd.Function):
    """``logsumexp(x @ W + b)`` per row, keeping only ``exp(z - max)`` for a lean backward.

    The gradient is ``softmax(z) @ W^T``, computed as ``(e @ W^T) / sum(e)``: no other
    ``[rows, d_vocab]`` tensor is made, forward or backward.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        e = torch.addmm(b, x, w)
        top = e.amax(-1, keepdim=True)
        e.sub_(top).exp_()
        total = e.sum(-1)
        ctx.save_for_backward(e, total, w)
        return top.squeeze(-1) + total.log()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        e, total, w = ctx.saved_tensors
        return (e @ w.T) * (grad / total).unsqueeze(-1), None, None


def _plain_unembed(adapter: ModelAdapter) -> bool:
    """Whether logits are exactly ``x @ W_U + b_U`` in float32 (no soft cap or scaling)."""
    if adapter.W_U.dtype != torch.float32:
        return False
    probe = torch.linspace(-200.0, 200.0, adapter.d_vocab, device=adapter.W_U.device)[None]
    return torch.equal(adapter.model.adapter.apply_output_logits_transform(probe.clone()), probe)


def kl_step(
    lens: TunedLens, model: Any, tokens: Int[Tensor, "batch pos"], *, scale: float
) -> Float[Tensor, "3 layer"]:
    """Accumulate ``scale * d(summed KL)/d(translators)`` for one batch; the model is frozen.

    ``KL(p || q) = sum p log p + lse(z) - E_p[z]``; with a plain unembedding
    ``E_p[z] = x . (W_U p) + b_U . p`` for normalised residuals ``x``, so ``W_U p`` is
    computed once per batch and each layer only needs ``lse(z)`` (see
    :class:`_ReadoutLogSumExp`). Other models take the generic autograd path.

    Returns:
        Per layer, detached float64 sums over tokens of KL (nats), ``|h|^2 / d_model`` of
        the inputs, and ``|h'|^2 / d_model`` of the translated residuals.
    """
    adapter = lens.adapter
    cap = capture(model, tokens)
    rows = cap.stack("resid_pre").flatten(1, 2)
    reference = Reference.from_logits(cap.logits.flatten(0, 1))
    plain = _plain_unembed(adapter)
    if plain:
        w_u, b_u = adapter.W_U.detach(), adapter.b_U.detach()
        mean_w = reference.probs @ w_u.T  # [n, d_model]: W_U p for every row
        offset = reference.neg_entropy - reference.probs @ b_u
    sums = torch.zeros(3, adapter.n_layers, dtype=torch.float64)
    for lo in range(0, rows.shape[1], ROWS_PER_READOUT):
        hi = lo + ROWS_PER_READOUT
        part = Reference(reference.probs[lo:hi], reference.neg_entropy[lo:hi])
        for layer in range(adapter.n_layers):
            h = rows[layer, lo:hi]
            moved = lens.transform_hidden(h, layer)
            if plain:
                x = adapter.final_norm(moved)
                lse = _ReadoutLogSumExp.apply(x, w_u, b_u)
                kl = offset[lo:hi] + lse - (x * mean_w[lo:hi]).sum(-1)
            else:
                kl = kl_nats(part, adapter.readout(moved))
            (kl.sum() * scale).backward()
            sums[:, layer] += torch.stack(
                [
                    kl.detach().double().sum().cpu(),
                    h.double().pow(2).mean(-1).sum().cpu(),
                    moved.detach().double().pow(2).mean(-1).sum().cpu(),
                ]
            )
    return sums


def make_optimizer(
    lens: TunedLens, name: str, lr: float, scales: Float[Tensor, "2 layer"]
) -> torch.optim.Optimizer:
    """Adam, or the paper's SGD, with one group per weight and bias and per-layer step sizes.

    ``scales`` holds each layer's input RMS and translated-output RMS. Weight and bias
    step sizes are scaled so that a step moves every layer's output by about the same
    fraction (Adam steps do not depend on the gradient's scale, SGD steps do). Each group
    keeps its undecayed step size as ``base_lr``.
    """
    power = 1 if name == "adam" else 2
    groups = []
    for translator, rms_in, rms_out in zip(lens.translators, *scales.tolist(), strict=True):
        ratio = rms_out / max(rms_in, 1e-12)
        groups.append({"params": [translator.weight], "base_lr": lr * ratio**power})
        groups.append({"params": [translator.bias], "base_lr": lr * rms_out**power})
    for group in groups:
        group["lr"] = group["base_lr"]
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
