"""The readout's matmul precision: measured per device, and switched safely between threads.

``"auto"`` is measured once per device and machine (:func:`matmul_rates`, cached in memory
and in lenskit's cache folder). On CPUs with oneDNN, bf16 inputs with float32 sums and
float32 output have no per-call form in torch (``torch.mm(..., out_dtype=)`` is CUDA-only;
bf16 ``mm`` and ``addmm`` round their output to bf16), so the readout switches oneDNN's
float32 matmuls to bf16 arithmetic around its own matmul. That switch is process-wide:
while it is on, any float32 matmul in another thread would silently run in bf16 too.
:func:`fp32_matmuls` is the guard: the switch is taken only while no thread holds it
(and a thread asking for it waits until the switch is off again), and every exact matmul
of the readout engine, trajectories, comparisons and evaluations holds it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from lenskit.errors import LenskitError

__all__ = [
    "PRECISIONS",
    "PRECISION_ENV",
    "SPEEDUP_NEEDED",
    "fp32_matmuls",
    "matmul_dtype",
    "matmul_rates",
    "resolve_precision",
]

PRECISION_ENV = "LENSKIT_PRECISION"
PRECISIONS = ("auto", "exact", "bf16", "fp16")
SPEEDUP_NEEDED = 1.25
"""``"auto"`` takes bf16 only where its matmul is at least this much faster than float32."""
_BENCH_SHAPE = (512, 576, 8192)  # rows x d_model x a slice of the vocabulary
LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _SwitchGuard:
    """Shared holders (true float32 matmuls) or one exclusive holder (the bf16 switch)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared: dict[int, int] = {}  # thread id -> depth (re-entrant)
        self._switched_by: int | None = None
        self._depth = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            # The switching thread's own float32 work is its own business (and cannot overlap).
            while self._switched_by is not None and self._switched_by != me:
                self._cond.wait()
            self._shared[me] = self._shared.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._shared[me] -= 1
                if not self._shared[me]:
                    del self._shared[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            while (self._switched_by not in (None, me)) or any(t != me for t in self._shared):
                self._cond.wait()
            self._switched_by, self._depth = me, self._depth + 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._switched_by = None
                self._cond.notify_all()


_GUARD = _SwitchGuard()


def fp32_matmuls() -> contextlib.AbstractContextManager[None]:
    """Within: no readout switches float32 matmuls to bf16 (wait until a switch is over).

    Hold it around float32 matmuls that must stay float32 while other threads may read
    in bf16 (re-entrant; any number of threads may hold it at once).
    """
    return _GUARD.shared()


@contextlib.contextmanager
def bf16_inside_fp32() -> Iterator[None]:
    """Within: float32 oneDNN matmuls round their inputs to bf16 and sum in float32.

    Exclusive: waits until no thread holds :func:`fp32_matmuls`, and holds them off.
    """
    with _GUARD.exclusive():
        before = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            yield
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = before


def lowp_mm(x: Tensor, w: Tensor, w_low: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``x @ w`` with inputs rounded to ``dtype`` and float32 sums; float32 out.

    Falls back to a plain low-precision matmul (its output rounded to ``dtype``) where
    neither CUDA's ``out_dtype`` nor oneDNN's bf16 switch is available.
    """
    if x.device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        with bf16_inside_fp32():
            return x @ w
    w_low = w.to(dtype) if w_low is None else w_low
    if x.device.type == "cuda":
        with contextlib.suppress(RuntimeError, NotImplementedError, TypeError):
            return torch.mm(x.to(dtype), w_low, out_dtype=torch.float32)
    return (x.to(dtype) @ w_low).float()


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        flags = ""
        with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = " ".join(f for f in line.split() if "avx" in f or "amx" in f)
                    break
        name = f"{platform.processor() or platform.machine()} {flags}"
    return f"{device.type}|{name}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _time_mm(fn: Any, device: torch.device) -> float:
    """Best of five wall times of ``fn()`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - tic)
    return max(best, 1e-9)


def _measure(device: torch.device) -> dict[str, float]:
    rows, d, v = _BENCH_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen).to(device)
    w = (torch.randn(d, v, generator=gen) * 0.05).to(device)
    flop = 2 * rows * d * v
    with fp32_matmuls():
        rates = {"fp32": flop / _time_mm(lambda: x @ w, device) / 1e9}
    for name, dtype in LOWP.items():
        low, xl = w.to(dtype), x.to(dtype)
        mixed = functools.partial(lowp_mm, x, w, low, dtype)
        rates[name] = flop / _time_mm(mixed, device) / 1e9
        rates[f"{name}_native"] = (
            flop / _time_mm(functools.partial(torch.mm, xl, low), device) / 1e9
        )
    return rates


@functools.lru_cache(maxsize=8)
def _rates(key: str, device: str) -> dict[str, float]:
    from lenskit.io import atomic_write_json, cache_dir

    path = None
    with contextlib.suppress(OSError):
        path = cache_dir() / "readout-rates.json"
    known: dict[str, Any] = {}
    if path is not None and path.is_file():
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(path.read_text(encoding="utf-8"))
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and all(isinstance(entry.get(n), float) for n in ("fp32", "bf16")):
        return entry
    rates = _measure(torch.device(device))
    if path is not None:
        with contextlib.suppress(OSError, TypeError):
            atomic_write_json(path, {**(known if isinstance(known, dict) else {}), key: rates})
    return rates


def matmul_rates(device: str | torch.device = "cpu", *, fresh: bool = False) -> dict[str, float]:
    """GFLOP/s of a readout-shaped matmul on ``device``: float32 and each low precision.

    ``bf16`` / ``fp16`` are the readout's own low-precision path (float32 in and out,
    rounded inputs inside); ``*_native`` a plain matmul in that type (rounded output).
    Measured once per device and machine (cached in memory and in lenskit's cache
    folder); ``fresh=True`` measures again.
    """
    device = torch.device(device)
    if fresh:
        return _measure(device)
    return dict(_rates(_device_key(device), str(device)))


def resolve_precision(precision: str | None = None, device: str | torch.device = "cpu") -> str:
    """The precision to read in: ``"exact"``, ``"bf16"`` or ``"fp16"``.

    ``precision`` None takes ``$LENSKIT_PRECISION``, else ``"auto"``; ``"auto"`` is
    measured on ``device`` (:func:`matmul_rates`).

    Raises:
        LenskitError: For an unknown precision.
    """
    chosen = precision if precision is not None else os.environ.get(PRECISION_ENV) or "auto"
    if chosen not in PRECISIONS:
        source = "precision" if precision is not None else f"${PRECISION_ENV}"
        raise LenskitError(
            f"{source} is {chosen!r}, not a precision: use one of {', '.join(PRECISIONS)}"
        )
    if chosen != "auto":
        return chosen
    rates = matmul_rates(device)
    return "bf16" if rates["bf16"] >= SPEEDUP_NEEDED * rates["fp32"] else "exact"


def matmul_dtype(device: str | torch.device = "cpu", precision: str | None = None) -> torch.dtype:
    """The dtype the unembedding matmul's inputs take on ``device`` at ``precision``."""
    return LOWP.get(resolve_precision(precision, device), torch.float32)
