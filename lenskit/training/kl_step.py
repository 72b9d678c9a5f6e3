"""One exact-KL gradient step of a tuned lens, and its optimizer.

:func:`kl_step` accumulates the gradient of ``KL(model output || lens)`` for one batch,
layer by layer and chunk by chunk, with a lean custom backward where the unembedding is
plain ``x @ W_U + b_U``; :func:`make_optimizer` gives per-layer step sizes.

In ``precision="bfloat16"`` the two unembedding matmuls of each readout run in bfloat16
(float32 accumulation inside the matmul; float32 master weights, norms, sums and
gradients everywhere else). Their extra rows and column fold the bias and the
log-sum-exp's shift into the first matmul and the row sums into the second, so the
``[rows, d_vocab]`` block is touched once, by an in-place ``exp``. The translated rows of
every layer are read together, :data:`MATMUL_ROWS` rows per matmul (a few layers' worth),
so each call's one-off cost (packing ``W_U``) is spread over many rows.

Example:
    >>> import lenskit
    >>> from lenskit.lenses.tuned import TunedLens
    >>> model = lenskit.load_model("tiny-llama")
    >>> lens = TunedLens.untrained(model)
    >>> tokens = torch.randint(0, model.cfg.d_vocab, (1, 8))
    >>> kl_step(lens, model, tokens, scale=1.0).shape[1] == model.cfg.n_layers
    True
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
from lenskit.readout import scratch_buffer
from lenskit.residual import capture, row_capture_points
from lenskit.training.precision import forward_autocast
from lenskit.training.rows import stack_rows, train_rows, translators

__all__ = [
    "MATMUL_ROWS",
    "STEP_ROWS",
    "Bf16Unembedding",
    "bf16_logsumexp",
    "kl_step",
    "make_optimizer",
    "step_flops",
]

MATMUL_ROWS = {torch.bfloat16: 2048, torch.float32: 512}
"""Rows per unembedding matmul of the KL step: ``[rows, d_vocab]`` is 200 MB either way."""
STEP_ROWS = 16384
"""Translated rows (layers x tokens) whose autograd graph is held at once."""
_LOG_LOW, _LOG_HIGH = -10.0, 10.0  # log(sum exp(z - shift)) kept here: bf16 rounds z - shift


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


class Bf16Unembedding:
    """``W_U`` and ``b_U`` in bfloat16, ready for :func:`bf16_logsumexp`.

    ``w`` is ``[W_U; b_U; 1]`` (``[d_model + 2, d_vocab]``): input columns ``[x, 1,
    -shift]`` add the bias and subtract a per-row shift inside the matmul. ``wt`` is
    ``W_U^T``, a transposed view of ``w``'s first rows (``e @ wt`` runs 4-12% faster on
    it than on a contiguous copy, with the same result), and ``ones`` a column of ones,
    for ``exp``'s row sums (as a matrix-vector product: a 577th column of ``wt`` would
    slow its matmul by a tenth). Made once per run.
    """

    def __init__(self, w_u: Float[Tensor, "d_model d_vocab"], b_u: Float[Tensor, " d_vocab"]):
        ones = w_u.new_ones(1, w_u.shape[1])
        w_u = w_u.detach()
        self.w = torch.cat([w_u, b_u.detach()[None], ones]).to(torch.bfloat16)
        self.d_model = w_u.shape[0]
        self.wt = self.w[: self.d_model].T  # [d_vocab, d_model], a view
        self.ones = ones.to(torch.bfloat16).T.contiguous()  # [d_vocab, 1]


def _augmented(x: Tensor, shift: Tensor, un: Bf16Unembedding) -> Tensor:
    """``[x, 1, -shift]`` in bfloat16 (``shift`` already a bfloat16 value)."""
    xa = torch.empty(x.shape[0], un.d_model + 2, dtype=torch.bfloat16, device=x.device)
    xa[:, : un.d_model] = x
    xa[:, un.d_model] = 1.0
    xa[:, un.d_model + 1] = -shift
    return xa


def _shifted_sums(x: Tensor, shift: Tensor, un: Bf16Unembedding) -> Tensor:
    """``[exp(z - shift) @ W_U^T, sum exp(z - shift)]`` per row, float32, ``z = x W_U + b_U``."""
    xa = _augmented(x, shift, un)
    if x.device.type == "cpu":  # a reused buffer: a fresh 200 MB one costs page faults
        out = scratch_buffer(2, x.shape[0], un.w.shape[1], torch.bfloat16, x.device)
        e = torch.mm(xa, un.w, out=out)
    else:
        e = torch.mm(xa, un.w)
    e.exp_()
    return torch.cat([e @ un.wt, e @ un.ones], 1).float()


class _Bf16LogSumExp(torch.autograd.Function):
    """``logsumexp(x @ W_U + b_U)`` per row with bfloat16 matmuls; see :class:`Bf16Unembedding`.

    The shift only has to be near each row's maximum: rows whose sum falls outside
    ``[e^-10, e^10]`` are computed again with the shift their sum gives (or, after an
    overflow, their exact maximum).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, un: Bf16Unembedding, shift: Tensor) -> Tensor:
        shift = shift.detach().to(torch.bfloat16).float()  # the value the matmul subtracts
        sums = _shifted_sums(x.detach(), shift, un)
        for _ in range(2):
            log_total = sums[:, -1].log()
            bad = ~(torch.isfinite(log_total) & (log_total > _LOG_LOW) & (log_total < _LOG_HIGH))
            if not bool(bad.any()):
                break
            rows = bad.nonzero().squeeze(-1)
            fine = torch.isfinite(log_total[rows]) & (sums[rows, -1] > 0)
            z = torch.mm(_augmented(x[rows].detach(), x.new_zeros(len(rows)), un), un.w)
            exact = z.amax(-1).float()
            moved = torch.where(fine, shift[rows] + log_total[rows], exact)
            shift[rows] = moved.to(torch.bfloat16).float()
            sums[rows] = _shifted_sums(x[rows].detach(), shift[rows], un)
        total = sums[:, -1]
        ctx.save_for_backward(sums[:, :-1] / total.unsqueeze(-1))
        return shift + total.log()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (mean_w,) = ctx.saved_tensors
        return mean_w * grad.unsqueeze(-1), None, None


def bf16_logsumexp(
    x: Float[Tensor, "cell d_model"], un: Bf16Unembedding, shift: Float[Tensor, " cell"]
) -> Float[Tensor, " cell"]:
    """``logsumexp(x @ W_U + b_U)`` per row in bfloat16 matmuls, differentiable in ``x``."""
    return _Bf16LogSumExp.apply(x, un, shift)


def _plain_unembed(adapter: ModelAdapter) -> bool:
    """Whether logits are exactly ``x @ W_U + b_U`` in float32 (no soft cap or scaling)."""
    if adapter.W_U.dtype != torch.float32:
        return False
    probe = torch.linspace(-200.0, 200.0, adapter.d_vocab, device=adapter.W_U.device)[None]
    return torch.equal(adapter.model.adapter.apply_output_logits_transform(probe.clone()), probe)


class _PlainReadout:
    """The batch-wide parts of the plain path: ``W_U p``, ``sum p log p - b_U . p``."""

    def __init__(
        self, adapter: ModelAdapter, reference: Reference, logits: Tensor, bf16: Any
    ) -> None:
        self.w_u, self.b_u = adapter.W_U.detach(), adapter.b_U.detach()
        self.bf16 = bf16
        if bf16 is not None:
            self.mean_w = (reference.probs.to(torch.bfloat16) @ bf16.wt).float()
            # log-sum-exp as max z - log max p: near every layer's maximum
            self.shift = logits.float().amax(-1) - reference.probs.amax(-1).log()
        else:
            self.mean_w = reference.probs @ self.w_u.T  # [n, d_model]: W_U p for every row
        self.offset = reference.neg_entropy - reference.probs @ self.b_u
        self.rows = MATMUL_ROWS[torch.float32 if bf16 is None else torch.bfloat16]

    def kl(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """KL (nats) of normalised rows ``x`` (``[layer, tokens lo:hi of the batch, d]``).

        Several layers' rows go through each matmul, the last layers first; in bfloat16
        each block's shift is the same tokens' log-sum-exp in the layer after it (the
        model's own output for the last block).
        """
        n = x.shape[1]
        per = max(1, self.rows // n)  # layers per matmul
        parts = []
        for block in reversed(x.split(per)):  # split: one gradient copy, not one per block
            flat = block.reshape(-1, block.shape[-1])
            if self.bf16 is not None:
                shift = self.shift[lo:hi].repeat(block.shape[0])
                lse = bf16_logsumexp(flat, self.bf16, shift).view(block.shape[0], n)
                self.shift[lo:hi] = lse[0].detach()
            else:
                lse = _ReadoutLogSumExp.apply(flat, self.w_u, self.b_u).view(block.shape[0], n)
            parts.append(lse)
        lse = torch.cat(parts[::-1])
        expected = torch.einsum("lnd,nd->ln", x, self.mean_w[lo:hi])  # E_p[z] - b_U . p
        return self.offset[lo:hi] + lse - expected


def kl_step(
    lens: TunedLens,
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    scale: float,
    bf16: Bf16Unembedding | None = None,
) -> Float[Tensor, "3 layer"]:
    """Accumulate ``scale * d(summed KL)/d(translators)`` for one batch; the model is frozen.

    ``KL(p || q) = sum p log p + lse(z) - E_p[z]``; with a plain unembedding
    ``E_p[z] = x . (W_U p) + b_U . p`` for normalised residuals ``x``, so ``W_U p`` is
    computed once per batch and each layer only needs ``lse(z)`` (see
    :class:`_ReadoutLogSumExp`). Other models take the generic autograd path (float32).

    Args:
        lens: The lens whose translators get gradients.
        model: The frozen model.
        tokens: The batch.
        scale: Factor of the summed KL whose gradient is accumulated.
        bf16: Unembedding matrices for bfloat16 matmuls (None: float32). With them the
            model's forward pass runs under bfloat16 autocast too
            (:func:`~lenskit.training.precision.forward_autocast`), and its output
            distribution is read from its final residual in float32.

    Returns:
        Per translator row (:func:`~lenskit.training.rows.train_rows`: the block inputs,
        and ``L12.mid`` rows where the lens has them), detached float64 sums over tokens
        of KL (nats), ``|h|^2 / d_model`` of the inputs, and ``|h'|^2 / d_model`` of the
        translated residuals.
    """
    adapter = lens.adapter
    read = train_rows(lens)
    autocast = forward_autocast(model) if bf16 is not None else None
    cap = capture(
        model, tokens, points=row_capture_points(read), logits=autocast is None, autocast=autocast
    )
    rows = stack_rows(cap, read)
    if autocast is None:
        logits = cap.logits.flatten(0, 1)
    else:  # the model's own readout of its final residual, in float32
        with torch.no_grad():
            logits = adapter.readout(cap.final.flatten(0, 1))
    reference = Reference.from_logits(logits)
    sums = torch.zeros(3, len(read), dtype=torch.float64)
    if not _plain_unembed(adapter):
        return _generic_step(lens, rows, reference, scale, sums)
    plain = _PlainReadout(adapter, reference, logits, bf16)
    step = min(rows.shape[1], ROWS_PER_READOUT, max(1, STEP_ROWS // len(read)))
    for lo in range(0, rows.shape[1], step):
        hi = lo + step
        h = rows[:, lo:hi]
        moved = torch.stack(
            [lens.transform_point(h[k], row.layer, row.point) for k, row in enumerate(read)]
        )
        kl = plain.kl(adapter.final_norm(moved), lo, hi)
        (kl.sum() * scale).backward()
        sums += _row_sums(kl, h, moved)
    return sums


def _row_sums(kl: Tensor, h: Tensor, moved: Tensor) -> Tensor:
    """Per row: summed KL, ``|h|^2 / d_model`` and ``|h'|^2 / d_model`` (float64, on CPU)."""
    rms2 = [r.pow(2).mean(-1).double().sum(-1) for r in (h, moved.detach())]  # float32 rows
    return torch.stack([kl.detach().double().sum(-1), *rms2]).cpu()


def _generic_step(
    lens: TunedLens, rows: Tensor, reference: Reference, scale: float, sums: Tensor
) -> Tensor:
    """:func:`kl_step` through the model's own readout (float32 autograd), layer by layer."""
    read = train_rows(lens)
    for lo in range(0, rows.shape[1], ROWS_PER_READOUT):
        hi = lo + ROWS_PER_READOUT
        part = Reference(reference.probs[lo:hi], reference.neg_entropy[lo:hi])
        for layer, row in enumerate(read):
            h = rows[layer, lo:hi]
            moved = lens.transform_point(h, row.layer, row.point)
            kl = kl_nats(part, lens.adapter.readout(moved))
            (kl.sum() * scale).backward()
            sums[:, layer] += _row_sums(kl, h, moved)
    return sums


def step_flops(adapter: ModelAdapter, rows: int | None = None) -> float:
    """Multiply-adds x 2 of the unembedding matmuls of one KL step token (all rows).

    ``rows`` is the number of translator rows (default: one per block).
    """
    rows = adapter.n_layers if rows is None else rows
    return 2.0 * 2 * adapter.d_model * adapter.d_vocab * rows


def make_optimizer(
    lens: TunedLens, name: str, lr: float, scales: Float[Tensor, "2 layer"]
) -> torch.optim.Optimizer:
    """Adam, or the paper's SGD, with one group per weight and bias and per-layer step sizes.

    ``scales`` holds each translator row's input RMS and translated-output RMS (rows as
    :func:`~lenskit.training.rows.train_rows` orders them). Weight and bias
    step sizes are scaled so that a step moves every layer's output by about the same
    fraction (Adam steps do not depend on the gradient's scale, SGD steps do). Each group
    keeps its undecayed step size as ``base_lr``.
    """
    power = 1 if name == "adam" else 2
    groups = []
    for translator, rms_in, rms_out in zip(translators(lens), *scales.tolist(), strict=True):
        ratio = rms_out / max(rms_in, 1e-12)
        groups.append({"params": [translator.weight], "base_lr": lr * ratio**power})
        groups.append({"params": [translator.bias], "base_lr": lr * rms_out**power})
    for group in groups:
        group["lr"] = group["base_lr"]
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
