"""Data-parallel training over several processes or GPUs, launched with ``torchrun``.

    torchrun --standalone --nproc_per_node 2 -m mqsa.cli train --data ... --out ...

Every process builds the same model from the same seed and draws the same
batch order; each takes its share of every global batch (rows rank, rank +
world, ...), and gradients are averaged across processes after each backward
(one flattened all-reduce), so the replicas stay identical. Gloo on CPU,
NCCL on CUDA. Every rank evaluates (the decisions then agree without
messages); only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place among the training processes (1 process = no distribution)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device_type: str) -> World:
        """Join the process group torchrun describes in the environment, if any."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return cls(
            rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0))
        )

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch."""
        return batch[self.rank :: self.size]

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Replace every gradient by its mean over the processes (one all-reduce)."""
        if not self.distributed:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def checksums(self, model: torch.nn.Module) -> list[str]:
        """Every rank's sha256 of its parameters, gathered (one entry when not distributed)."""
        digest = hashlib.sha256()
        for p in model.parameters():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        mine = digest.hexdigest()
        if not self.distributed:
            return [mine]
        gathered: list[str] = [""] * self.size
        dist.all_gather_object(gathered, mine)
        return gathered

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
