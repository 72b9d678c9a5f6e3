"""Progress reports for long loops (the app draws them), and safe interruption.

:func:`deferred_interrupt` holds Ctrl-C and SIGTERM until a block ends, so an update is applied
whole or not at all; :func:`sigterm_as_interrupt` makes SIGTERM stop a loop as Ctrl-C does;
:func:`frozen` turns off a model's gradients for a block.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BasisProgress",
    "BasisProgressCallback",
    "Progress",
    "ProgressCallback",
    "deferred_interrupt",
    "frozen",
    "sigterm_as_interrupt",
]


@dataclass(frozen=True)
class Progress:
    """Where a long loop stands, passed to its ``on_progress`` callback after each batch.

    Attributes:
        phase: What runs, e.g. ``"closed-form"``, ``"fine-tune"`` or ``"evaluate"``.
        done: Tokens of this phase done (over all resumed sessions, where a loop resumes).
        total: Tokens of this phase in all.
        tokens_per_s: Tokens per second of this phase so far in this session.
        seconds: Wall time so far (over all resumed sessions).
        kl_bits: Mean KL (bits per token and layer) of the last batch, where a loop has one.
    """

    phase: str
    done: int
    total: int
    tokens_per_s: float
    seconds: float
    kl_bits: float | None = None

    @property
    def fraction(self) -> float:
        """Share of the phase done, in [0, 1]."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else 1.0

    @property
    def eta_seconds(self) -> float:
        """Seconds left in this phase at the current speed (NaN before a speed is known)."""
        rate = self.tokens_per_s
        return (self.total - self.done) / rate if rate > 0 else math.nan


ProgressCallback = Callable[[Progress], None]
"""A callback taking a :class:`Progress`; if it raises, the loop stops (see the loop's docs)."""


@dataclass(frozen=True)
class BasisProgress:
    """Where a causal basis extraction stands, passed to its ``on_progress`` callback.

    Attributes:
        phase: ``"capture"`` (reading the residuals, once), ``"search"`` (after each L-BFGS
            iteration of a direction), ``"measure"`` (measuring a layer's directions on
            held-out text) or ``"done"`` (a layer finished, and saved where there is a folder).
        layer: The layer worked on (None while capturing).
        layers_done: Layers finished before ``layer``.
        n_layers: Layers in the run.
        direction: Directions of ``layer`` finished (the one searched is ``direction + 1``).
        k: Directions per layer.
        iteration: L-BFGS iterations of the searched direction so far (0 outside a search).
        max_iter: Most iterations per direction.
        objective_bits: The searched direction's lens influence (bits per token) at its
            last iteration, during a search.
        seconds: Wall time since the extraction started.
        search_seconds: Wall time spent on finished directions (the base of the ETA).
    """

    phase: str
    layer: int | None
    layers_done: int
    n_layers: int
    direction: int
    k: int
    iteration: int
    max_iter: int
    objective_bits: float | None
    seconds: float
    search_seconds: float

    @property
    def directions_done(self) -> int:
        """Directions finished over all layers."""
        return self.layers_done * self.k + self.direction

    @property
    def fraction(self) -> float:
        """Share of all directions found, in [0, 1]."""
        total = self.n_layers * self.k
        return min(1.0, self.directions_done / total) if total > 0 else 1.0

    @property
    def eta_seconds(self) -> float:
        """Seconds left for the remaining directions at the speed so far (NaN before one)."""
        done = self.directions_done
        if done == 0:
            return math.nan
        return self.search_seconds / done * (self.n_layers * self.k - done)


BasisProgressCallback = Callable[[BasisProgress], None]
"""A callback taking a :class:`BasisProgress`; if it raises, the extraction stops."""


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (and SIGTERM) until the block ends, so an update is applied whole or not at all.

    A held Ctrl-C raises ``KeyboardInterrupt`` at the end of the block; a held SIGTERM is
    raised again there, for the handler in place before the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if signal.SIGTERM in caught:
            signal.raise_signal(signal.SIGTERM)
        if signal.SIGINT in caught:
            raise KeyboardInterrupt


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into ``KeyboardInterrupt`` for the block, so it stops a loop as Ctrl-C does.

    Only in the main thread (elsewhere signals cannot be handled); the previous handler is
    put back at the end.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


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
