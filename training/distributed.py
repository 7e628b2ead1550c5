"""Data-parallel training over several processes or GPUs, launched with ``torchrun``.

    torchrun --standalone --nproc_per_node 2 -m mqsa.cli train --data ... --out ...

Every process builds the same model from the same seed and draws the same
batch order; each takes its share of every global batch (rows rank, rank +
world, ...). The training step's loss (the trainer's ``Objective``: the model,
the blend, the item table, TED's students and the L2 penalty, all in one
``forward``) runs inside torch's DistributedDataParallel, which averages every
parameter's gradient over the processes during ``backward``, so the replicas
stay identical. Gloo on CPU, NCCL on CUDA. Every rank evaluates (the decisions
then agree without messages); only rank 0 writes files.

DDP replaced a hand-written average (one flattened all-reduce after ``backward``).
On the 2-core Intel Xeon (2 processes of 1 thread, gloo; docs/speed.md) every
measured run ended with the same weights, bit for bit, and the speed did not
differ: 117.9 against 118.3 ms a step at 2,000 items, 259.5 against 259.5 at
12,000 (timed in alternating blocks within one job). The average of the shards'
gradients is the full batch's gradient only when the shards hold the same number
of real positions (and TED items): each shard's loss is a mean over its own rows.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` as the training step calls it: itself on one process, else inside
        :class:`DistributedDataParallel`, which averages the gradients of every parameter
        of ``module`` over the processes during ``backward`` (bucket by bucket, as they are
        ready). Its ``forward`` must use every parameter in every step (no unused-parameter
        search is asked for); evaluation and checkpoints use ``module`` itself."""
        if not self.distributed:
            return module
        device_ids = [self.local_rank] if device.type == "cuda" else None  # the trainer's cuda:LOCAL_RANK
        return DistributedDataParallel(module, device_ids=device_ids)  # MQSA has no buffers to broadcast

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
        """Leave the process group once every rank is done with it (a rank that tore it down
        while another still used it aborted: 'terminate called without an active exception')."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
