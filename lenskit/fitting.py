"""The settings and pieces a tuned lens is fitted with (:mod:`lenskit.training` runs them).

- :class:`TrainConfig`: every setting of a training run (re-exported by ``training``).
- :func:`normalized_target` and :class:`NormalEquations`: the closed-form start, a ridge
  regression per layer of what the final norm sees (before its gain and bias) on
  ``[h_layer, 1]``, from running float64 ``X^T X`` and ``X^T Y``, rescaled to the layer.
- :func:`kl_step`: the exact KL gradient for one batch, layer by layer and chunk by chunk,
  with a lean custom backward where the unembedding is plain ``x @ W_U + b_U``.
- :func:`make_optimizer`: per-layer step sizes.
- :class:`Dist`, :func:`deferred_interrupt`, :func:`frozen`: data parallelism, whole
  updates under Ctrl-C, and a frozen model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.layer_kl import ROWS_PER_READOUT, kl_nats
from lenskit.lenses.tuned import TunedLens
from lenskit.metrics import Reference
from lenskit.models import DEFAULT_MODEL, ModelAdapter
from lenskit.residual import capture

__all__ = ["Dist", "NormalEquations", "TrainConfig", "deferred_interrupt", "fit_closed_form",
           "frozen", "kl_step", "make_optimizer", "normalized_target", "set_translators"]

_DEFAULT_LR = {"adam": 1e-3, "sgd": 1.0}
_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class TrainConfig:
    """How to train a tuned lens; every field that changes the result is checked on resume.

    Attributes:
        model: Model name (see :func:`lenskit.load_model`).
        data: Corpus source for :func:`lenskit.data.load_corpus` (None: Shakespeare).
        tokens: KL fine-tuning budget in tokens, rounded down to whole steps (0: closed form
            only).
        seq_len: Tokens per chunk.
        tokens_per_step: Tokens per optimizer step, over all ranks (a multiple of seq_len).
        optimizer: ``"adam"``, or ``"sgd"`` (Nesterov momentum 0.9, weight decay 1e-3,
            gradient-norm clip 1.0, as in the paper).
        lr: Base step size (default 1e-3 for adam, 1.0 for sgd), decayed linearly to 0.
        init: ``"lstsq"`` (closed-form start) or ``"zero"`` (the logit lens).
        lstsq_tokens: Training tokens for the closed-form start.
        ridge: Ridge penalty relative to the mean diagonal of ``X^T X`` (keep it small:
            a few massive-activation dimensions dominate that mean in later layers).
        seed: Seed of the document split and batch order.
        checkpoint_every: Steps between checkpoints (0: only on Ctrl-C).
        held_out: Fraction of documents held out for the reported metrics.
        eval_tokens: Held-out tokens for the reported metrics.
        val_tokens: Training-split tokens (never trained on) that choose, per layer,
            between start and fine-tuned translator (0: always keep fine-tuned).
        device: Torch device of the model.
        dtype: Model dtype; half dtypes only on CUDA (they are slower than float32 on CPU).
    """

    model: str = DEFAULT_MODEL
    data: str | None = None
    tokens: int = 4096
    seq_len: int = 256
    tokens_per_step: int = 1024
    optimizer: str = "adam"
    lr: float | None = None
    init: str = "lstsq"
    lstsq_tokens: int = 32768
    ridge: float = 1e-6
    seed: int = 0
    checkpoint_every: int = 10
    held_out: float = 0.1
    eval_tokens: int = 2048
    val_tokens: int = 512
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        ints = {f.name for f in dataclasses.fields(self) if f.type == "int"}
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LenskitError(f"{name} must be a whole number >= 0, got {value!r}")
        choices = {"optimizer": ("adam", "sgd"), "init": ("lstsq", "zero"), "dtype": _DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LenskitError(f"unknown {name} {getattr(self, name)!r}: use one of "
                                   f"{', '.join(allowed)}")
        for name in ("lr", "ridge", "held_out"):
            value = getattr(self, name)
            if not (value is None and name == "lr") and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise LenskitError(f"{name} must be a number, got {value!r}")
        lr = _DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        object.__setattr__(self, "lr", float(lr))
        s = self.seq_len
        checks = [
            (isinstance(self.model, str) and self.model.strip() != "", "model must be a name"),
            (self.data is None or (isinstance(self.data, str) and self.data != ""),
             "data must be None (the default corpus) or a path or dataset name"),
            (s >= 1, "seq_len must be >= 1"),
            (self.tokens_per_step >= s and self.tokens_per_step % s == 0,
             f"tokens_per_step must be a positive multiple of seq_len={s}"),
            (self.tokens == 0 or self.tokens >= self.tokens_per_step,
             f"tokens must be 0 or at least tokens_per_step={self.tokens_per_step}"),
            (self.init == "zero" or self.lstsq_tokens >= s,
             f"lstsq_tokens must be at least seq_len={s} for init='lstsq'"),
            (self.eval_tokens >= s, f"eval_tokens must be at least seq_len={s}"),
            (self.val_tokens == 0 or self.val_tokens >= s,
             f"val_tokens must be 0 or at least seq_len={s}"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a positive number"),
            (math.isfinite(self.ridge) and self.ridge >= 0, "ridge must be a number >= 0"),
            (0 < self.held_out < 1, "held_out must be between 0 and 1, e.g. 0.1"),
            (isinstance(self.device, str) and self.device != "", "device must be e.g. cpu"),
            (self.dtype in ("float32", "float64") or self.device.startswith("cuda"),
             f"dtype {self.dtype} is slower than float32 on CPU: use float32, or a cuda device"),
        ]
        for ok, message in checks:
            if not ok:
                raise LenskitError(f"bad training config: {message}")

    @property
    def steps(self) -> int:
        """KL fine-tuning steps."""
        return self.tokens // self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are refused."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LenskitError(f"unknown training settings {', '.join(unknown)}: drop them")
        return cls(**values)


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
        self.xtx = torch.zeros(n_layers, d_model + 1, d_model + 1, dtype=torch.float64,
                               device=device)
        self.xty = torch.zeros(n_layers, d_model + 1, d_model, dtype=torch.float64, device=device)

    def batch(
        self, rows: Float[Tensor, "layer n d_model"], target: Float[Tensor, "n d_model"]
    ) -> tuple[Tensor, Tensor]:
        """One batch's contribution (add it with :meth:`add`)."""
        xa = torch.cat([rows.double(), rows.new_ones(*rows.shape[:2], 1, dtype=torch.float64)],
                       -1)
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
    """Copy ``[layer, d, d]`` weights and ``[layer, d]`` biases into the translators."""
    with torch.no_grad():
        for translator, w, b in zip(lens.translators, weights, biases, strict=True):
            translator.weight.copy_(w)
            translator.bias.copy_(b)


def fit_closed_form(
    model: Any, tokens: Int[Tensor, "chunk pos"], *, ridge: float = 0.0, batch_size: int = 4
) -> TunedLens:
    """The closed-form (least-squares) tuned lens fitted on ``tokens``, in float32."""
    adapter = ModelAdapter(model)
    normal = NormalEquations(adapter.n_layers, adapter.d_model, adapter.W_U.device)
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(adapter.W_U.device)
        cap = capture(model, batch, logits=False)
        rows = cap.stack("resid_pre").flatten(1, 2)
        normal.add(*normal.batch(rows, normalized_target(adapter, cap.final.flatten(0, 1))))
    lens = TunedLens(adapter, dtype=torch.float32)
    set_translators(lens, *normal.solve(ridge))
    return lens


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
            sums[:, layer] += torch.stack([kl.detach().double().sum().cpu(),
                                           h.double().pow(2).mean(-1).sum().cpu(),
                                           moved.detach().double().pow(2).mean(-1).sum().cpu()])
    return sums


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so an update is applied whole or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if caught:
            raise KeyboardInterrupt


@contextlib.contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Turn off ``requires_grad`` of the model's parameters for the block."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class Dist:
    """Rank, world size and reductions; a no-op outside ``torchrun``."""

    rank: int = 0
    world: int = 1
    device: torch.device | str = "cpu"
    owned: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> Dist:
        """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA)."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls(device=device)
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        nccl = dist.get_backend() == "nccl"
        return cls(dist.get_rank(), dist.get_world_size(), device if nccl else "cpu", owned)

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place."""
        if self.world > 1:
            import torch.distributed as dist

            buffer = tensor.to(self.device)
            dist.all_reduce(buffer)
            tensor.copy_(buffer)
        return tensor

    def close(self) -> None:
        """Tear down the process group if this object set it up."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


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
