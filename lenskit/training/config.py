"""Every setting of a tuned-lens training run: :class:`TrainConfig`, and the app's preset.

The CLI's ``lenskit train`` flags are generated from the fields (their ``metadata`` holds
the help text and the allowed values); the app's Train page takes its defaults from
:data:`QUICK`, a smaller run of the same settings.

Example:
    >>> from lenskit.training import TrainConfig
    >>> TrainConfig(model="tiny-llama", tokens=0).steps
    0
    >>> QUICK.tokens < TrainConfig().tokens
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lenskit.errors import LenskitError
from lenskit.settings import DEFAULT_MODEL, setting

__all__ = ["POINTS", "PRECISIONS", "QUICK", "TrainConfig"]

_DEFAULT_LR = {"adam": 1e-3, "sgd": 1.0}
_DTYPES = ("float32", "float64", "bfloat16", "float16")
PRECISIONS = ("auto", "float32", "bfloat16")
POINTS = ("resid_pre", "resid_pre,resid_mid")
"""Residual points a lens can be trained for: block inputs, or also ``L12.mid`` rows."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train a tuned lens; every field that changes the result is checked on resume.

    Each field's ``metadata["help"]`` says what it does (the CLI shows it), and
    ``metadata["choices"]`` lists the allowed values where there is a fixed set. ``lr``
    None means 1e-3 for adam and 1.0 for sgd; ``data`` None means the plays
    (``builtin:shakespeare``). Half model dtypes only on CUDA.
    """

    model: str = setting(DEFAULT_MODEL, "model name or folder")
    data: str | None = setting(
        "builtin:mix",
        "corpus file, folder, cached dataset or builtin:NAME (builtin:mix: plays, Python "
        "reference and docstrings in equal shares; builtin:shakespeare: the plays alone)",
    )
    tokens: int = setting(
        4096, "KL fine-tuning tokens, rounded down to whole steps (0: closed form only)"
    )
    minutes: float = setting(
        0.0,
        "wall-clock budget from launch to saved lens; the run splits it between closed "
        "form and KL steps and ignores --tokens (0: no budget)",
    )
    seq_len: int = setting(256, "tokens per chunk")
    tokens_per_step: int = setting(
        1024, "tokens per optimizer step over all ranks (a multiple of seq_len)"
    )
    optimizer: str = setting(
        "adam",
        "adam, or sgd (Nesterov momentum 0.9, weight decay 1e-3, gradient-norm clip 1)",
        ("adam", "sgd"),
    )
    lr: float | None = setting(None, "base step size, decayed linearly to 0 (adam 1e-3, sgd 1)")
    init: str = setting(
        "lstsq", "closed-form start (lstsq) or the logit lens (zero)", ("lstsq", "zero")
    )
    lstsq_tokens: int = setting(
        32768, "tokens for the closed-form start (with --minutes: at most this many)"
    )
    ridge: float = setting(1e-6, "ridge penalty relative to the mean diagonal of X^T X")
    seed: int = setting(0, "seed of the document split and batch order")
    checkpoint_every: int = setting(10, "KL steps between checkpoints (0: only on a stop)")
    held_out: float = setting(0.1, "fraction of documents held out for the report")
    eval_tokens: int = setting(2048, "held-out tokens for the report")
    val_tokens: int = setting(
        512, "training-split tokens (never trained on) that pick start or fine-tuned per layer"
    )
    report: bool = setting(True, "score the lens on held-out text at the end")
    precision: str = setting(
        "auto",
        "training matmul precision: the KL steps' unembedding and, in bfloat16, the model's "
        "forward passes (fp32 master weights and sums); auto: the faster here",
        PRECISIONS,
    )
    device: str = setting("cpu", "cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    dtype: str = setting("float32", "model dtype (half types only on cuda)", _DTYPES)
    points: str = setting(
        "resid_pre",
        "residual points to train translators for: resid_pre (block inputs), or "
        "resid_pre,resid_mid to add the stream between attention and MLP (rows L12.mid; "
        "twice the translators and KL-step work)",
        POINTS,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), f.metadata.get("choices")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise LenskitError(f"{f.name} must be a whole number >= 0, got {value!r}")
            if f.type == "int" and value < 0:
                raise LenskitError(f"{f.name} must be a whole number >= 0, got {value!r}")
            if allowed is not None and value not in allowed:
                raise LenskitError(f"unknown {f.name} {value!r}: use one of {', '.join(allowed)}")
            if f.type == "bool" and not isinstance(value, bool):
                raise LenskitError(f"{f.name} must be True or False, got {value!r}")
        for name in ("lr", "ridge", "held_out", "minutes"):
            value = getattr(self, name)
            if not (value is None and name == "lr") and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise LenskitError(f"{name} must be a number, got {value!r}")
        lr = _DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        object.__setattr__(self, "lr", float(lr))
        object.__setattr__(self, "minutes", float(self.minutes))
        for ok, message in self._checks():
            if not ok:
                raise LenskitError(f"bad training config: {message}")

    def _checks(self) -> list[tuple[bool, str]]:
        s = self.seq_len
        return [
            (isinstance(self.model, str) and self.model.strip() != "", "model must be a name"),
            (
                self.data is None or (isinstance(self.data, str) and self.data != ""),
                "data must be None (Shakespeare), builtin:NAME, a path or a dataset name",
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
            (
                math.isfinite(self.minutes) and self.minutes >= 0,
                "minutes must be a number >= 0 (0: no wall-clock budget)",
            ),
            (0 < self.held_out < 1, "held_out must be between 0 and 1, e.g. 0.1"),
            (isinstance(self.device, str) and self.device != "", "device must be e.g. cpu"),
            (
                self.dtype in ("float32", "float64") or self.device.startswith("cuda"),
                f"dtype {self.dtype} is slower than float32 on CPU: use float32, or a cuda device",
            ),
        ]

    @property
    def point_list(self) -> tuple[str, ...]:
        """:attr:`points` as a tuple of point names."""
        return tuple(self.points.split(","))

    @property
    def steps(self) -> int:
        """KL fine-tuning steps of a run without a wall-clock budget."""
        return self.tokens // self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are refused.

        Fields added since a checkpoint was written take their defaults.
        """
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LenskitError(f"unknown training settings {', '.join(unknown)}: drop them")
        return cls(**values)


QUICK = TrainConfig(
    tokens=2048,
    seq_len=128,
    tokens_per_step=256,
    lstsq_tokens=8192,
    eval_tokens=1024,
    val_tokens=256,
    checkpoint_every=5,
)
"""The app's Train page defaults: a run of a few minutes for a small model on two CPU cores."""
