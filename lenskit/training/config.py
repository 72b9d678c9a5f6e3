"""Every setting of a tuned-lens training run: :class:`TrainConfig`.

The CLI's ``lenskit train`` flags and the app's Train page take their defaults from it.

Example:
    >>> from lenskit.training import TrainConfig
    >>> TrainConfig(model="tiny-llama", tokens=0).steps
    0
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lenskit.errors import LenskitError
from lenskit.models import DEFAULT_MODEL

__all__ = ["TrainConfig"]

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
                raise LenskitError(
                    f"unknown {name} {getattr(self, name)!r}: use one of {', '.join(allowed)}"
                )
        for name in ("lr", "ridge", "held_out"):
            value = getattr(self, name)
            if not (value is None and name == "lr") and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise LenskitError(f"{name} must be a number, got {value!r}")
        lr = _DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        object.__setattr__(self, "lr", float(lr))
        s = self.seq_len
        checks = [
            (isinstance(self.model, str) and self.model.strip() != "", "model must be a name"),
            (
                self.data is None or (isinstance(self.data, str) and self.data != ""),
                "data must be None (the default corpus) or a path or dataset name",
            ),
            (s >= 1, "seq_len must be >= 1"),
            (
                self.tokens_per_step >= s and self.tokens_per_step % s == 0,
                f"tokens_per_step must be a positive multiple of seq_len={s}",
            ),
            (
                self.tokens == 0 or self.tokens >= self.tokens_per_step,
                f"tokens must be 0 or at least tokens_per_step={self.tokens_per_step}",
            ),
            (
                self.init == "zero" or self.lstsq_tokens >= s,
                f"lstsq_tokens must be at least seq_len={s} for init='lstsq'",
            ),
            (self.eval_tokens >= s, f"eval_tokens must be at least seq_len={s}"),
            (
                self.val_tokens == 0 or self.val_tokens >= s,
                f"val_tokens must be 0 or at least seq_len={s}",
            ),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a positive number"),
            (math.isfinite(self.ridge) and self.ridge >= 0, "ridge must be a number >= 0"),
            (0 < self.held_out < 1, "held_out must be between 0 and 1, e.g. 0.1"),
            (isinstance(self.device, str) and self.device != "", "device must be e.g. cpu"),
            (
                self.dtype in ("float32", "float64") or self.device.startswith("cuda"),
                f"dtype {self.dtype} is slower than float32 on CPU: use float32, or a cuda device",
            ),
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
