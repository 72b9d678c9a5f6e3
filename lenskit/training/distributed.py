"""Data parallelism under ``torchrun``: rank, world size and sums over ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Dist"]


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
