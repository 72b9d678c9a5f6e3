"""The readout's matmul precision, measured once per device.

``"auto"`` is measured once per device and machine (:func:`matmul_rates`, cached in memory
and in lenskit's cache folder). On CPUs, a bf16 matmul sums in float32 but rounds its
output to bf16 (``torch.mm(..., out_dtype=)`` is CUDA-only); the readout engine reads each
row's most likely tokens again in float32 (:meth:`lenskit.readout.Readout.unembed`).
oneDNN's process-wide switch of float32 matmuls to bf16 arithmetic is not used: it is no
faster on every CPU, and it would change other threads' float32 matmuls too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from typing import Any

import torch
from torch import Tensor

from lenskit.errors import LenskitError

__all__ = [
    "PRECISIONS",
    "PRECISION_ENV",
    "SPEEDUP_NEEDED",
    "lowp_mm",
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


def lowp_mm(x: Tensor, w_low: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``x @ w_low`` with ``x`` rounded to ``dtype`` and float32 sums inside the matmul.

    On CUDA the output is float32 (``out_dtype``); elsewhere it is rounded to ``dtype``
    (into ``out`` if given), which callers correct where it matters (see
    :meth:`lenskit.readout.Readout.unembed`).
    """
    if x.device.type == "cuda":
        with contextlib.suppress(RuntimeError, NotImplementedError, TypeError):
            return torch.mm(x.to(dtype), w_low, out_dtype=torch.float32)
    return torch.mm(x.to(dtype), w_low, out=out) if out is not None else x.to(dtype) @ w_low


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
    threads = torch.get_num_threads()
    return f"v2|{device.type}|{name}|torch {torch.__version__}|threads {threads}"


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
    out = torch.empty(rows, v, device=device)  # reused, as the readout reuses its buffers
    rates = {"fp32": flop / _time_mm(lambda: torch.mm(x, w, out=out), device) / 1e9}
    for name, dtype in LOWP.items():
        if name == "fp16" and device.type == "cpu":
            continue  # never auto's choice on a CPU, and there it can take a minute to time
        low = torch.empty(rows, v, dtype=dtype, device=device) if device.type == "cpu" else None
        mixed = functools.partial(lowp_mm, x, w.to(dtype).contiguous(), dtype, low)
        rates[name] = flop / _time_mm(mixed, device) / 1e9
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

    ``bf16`` / ``fp16`` are the readout's low-precision matmul (:func:`lowp_mm`); ``fp16``
    only on GPUs (CPUs are not timed in it: ``"auto"`` picks bf16 or float32 there).
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
