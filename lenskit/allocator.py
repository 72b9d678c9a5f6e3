"""Keep freed memory in the process, so that large tensors reuse it instead of fresh pages.

By default glibc's ``malloc`` gives every block over 32 MB its own ``mmap`` and returns
it to the system on ``free``; the next tensor of that size then touches fresh pages,
one page fault per 4 KB. A KL step makes and frees such blocks (``[rows, d_vocab]``
logits, activations of a whole batch) many times, about 550,000 faults per 1,024-token
step on SmolLM2, and on a virtual machine each fault is costly.

:func:`retain_freed_memory` asks glibc to serve large blocks from its heap and to keep up
to :data:`KEEP_BYTES` of freed heap: the faults of a step fall by about 85%, and the
step ran 12-17% faster where the host was quiet (README: The readout engine and its
precision). The process holds on to memory it has freed (its peak stays resident, and
glibc < 2.38 lets the heap grow a little past it) in exchange for not faulting it in
again. ``lenskit``'s command line calls it at start, where a process does one job and
ends; a notebook may call it too. It does nothing outside glibc (macOS, musl) or with
``LENSKIT_RETAIN_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["KEEP_BYTES", "RETAIN_ENV", "retain_freed_memory"]

RETAIN_ENV = "LENSKIT_RETAIN_MEMORY"
"""Set to ``0`` to leave ``malloc`` as it is."""
KEEP_BYTES = (1 << 31) - 1
"""Freed memory at the top of the heap kept for reuse: glibc's trim threshold, 2 GiB (its most)."""

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory; True if glibc took it.

    Applies to allocations made after the call, process-wide. Safe to call again.
    """
    if os.environ.get(RETAIN_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # no mmap per large block: it would be unmapped on free, and faulted in again
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1)
