"""A training run's state, as one typed object: what ``checkpoint.pt`` holds.

:class:`RunState` round-trips through :meth:`RunState.to_dict` and
:meth:`RunState.from_dict` (a dictionary of tensors, numbers and strings, which
``torch.load(..., weights_only=True)`` reads back).

Example:
    >>> from lenskit.training import TrainConfig
    >>> state = RunState(TrainConfig(model="tiny-llama"))
    >>> RunState.from_dict(state.to_dict()) == state
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lenskit.training.config import TrainConfig

__all__ = ["PHASES", "RunState"]

PHASES = ("lstsq", "kl")
_TENSORS = ("start_val", "tuned_val", "scales", "rng", "xtx", "xty")
_STATES = ("lens", "start")


@dataclass
class RunState:
    """Where a training run stands; everything a resume needs.

    Attributes:
        config: The run's settings.
        phase: ``"lstsq"`` (closed-form start) or ``"kl"`` (fine-tuning).
        done: Closed-form batches accumulated.
        lstsq_batches: Closed-form batches in all (None: from ``config.lstsq_tokens``; a
            wall-clock budget may end the closed form earlier and records it here).
        step: KL steps taken.
        steps: KL steps planned (``config.steps``, or planned from a wall-clock budget).
        seconds: Wall time over all sessions.
        timings: Seconds per phase and rates.
        precision: The KL-step precision in use (``"float32"`` or ``"bfloat16"``).
        lens: Translator weights at the checkpoint.
        start: Translator weights after the closed-form start.
        start_val: Validation KL (nats) of the start, per layer and token (``[layer,
            token]``; earlier checkpoints hold per-layer means).
        tuned_val: Validation KL (nats) of the fine-tuned lens, per layer and token.
        scales: Per-layer input and output RMS that set the step sizes.
        optimizer: The optimizer's state.
        rng: Torch's CPU random state.
        xtx: Partial ``X^T X`` of the closed form (single process only).
        xty: Partial ``X^T Y`` of the closed form.
    """

    config: TrainConfig
    phase: str = "lstsq"
    done: int = 0
    lstsq_batches: int | None = None
    step: int = 0
    steps: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    precision: str = "float32"
    lens: dict[str, Tensor] | None = None
    start: dict[str, Tensor] | None = None
    start_val: Tensor | None = None
    tuned_val: Tensor | None = None
    scales: Tensor | None = None
    optimizer: dict[str, Any] | None = None
    rng: Tensor | None = None
    xtx: Tensor | None = None
    xty: Tensor | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if min(self.done, self.step, self.steps) < 0 or self.seconds < 0:
            raise ValueError("done, step, steps and seconds must be >= 0")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunState):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """A dictionary for ``torch.save`` (the config as a dictionary)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["config"] = self.config.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunState:
        """The state :meth:`to_dict` gave; unknown keys are refused.

        Raises:
            ValueError: For unknown keys or values of the wrong kind.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown run-state keys {', '.join(unknown)}")
        values = {**values, "config": TrainConfig.from_dict(values["config"])}
        for key in _TENSORS:
            if values.get(key) is not None and not isinstance(values[key], Tensor):
                raise ValueError(f"{key} must be a tensor")
        for key in _STATES:
            state = values.get(key)
            if state is not None and not all(isinstance(v, Tensor) for v in state.values()):
                raise ValueError(f"{key} must map names to tensors")
        return cls(**values)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.equal(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
