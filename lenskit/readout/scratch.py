"""Per-thread reusable output buffers of the readout and the KL step.

A fresh 100 MB ``[rows, d_vocab]`` tensor per matmul block costs as much in page faults
as a third of its matmul; these buffers are made once per thread, slot and dtype.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["MATMUL_ROWS", "scratch_buffer"]

MATMUL_ROWS = 512
"""Rows per unembedding matmul: enough to run near peak; 512 x 49k float32 logits are 100 MB."""


class _Scratch(threading.local):
    """Per-thread output buffers, by (slot, dtype, device); each ``MATMUL_ROWS`` rows."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.dtype, str], Tensor] = {}

    def get(
        self, slot: int, rows: int, vocab: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        key = (slot, dtype, str(device))
        buf = self.buffers.get(key)
        if buf is None or buf.shape[1] != vocab or buf.shape[0] < rows:
            buf = self.buffers[key] = torch.empty(
                max(rows, MATMUL_ROWS), vocab, dtype=dtype, device=device
            )
        return buf[:rows]


_SCRATCH = _Scratch()


def scratch_buffer(
    slot: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """This thread's reusable ``[rows, cols]`` buffer number ``slot``, valid until its next use.

    Slots 0 and 1 are the readout's (``scratch=``), 3 its exact head's; training's KL
    step uses slot 2; evaluation uses 4 (lens rows), 5 and 6 (the model's logits and
    ``p``).
    """
    return _SCRATCH.get(slot, rows, cols, dtype, device)
