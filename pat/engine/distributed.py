"""Independent jobs (children, pool policies, cycles) sharded across ``torchrun`` ranks.

Under ``torchrun --nproc-per-node N`` every rank runs the same command; each takes the jobs
``i`` with ``i % world_size == rank``, and rank 0 alone writes shared files (the manifest)
after a barrier. Without torchrun it is one rank of one and nothing is initialised. The same
path runs on CPU with the gloo backend, which is how it is tested.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["Ranks", "init_ranks"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, jobs: Sequence[T]) -> list[T]:
        """This rank's share of ``jobs``: every ``world_size``-th, starting at ``rank``."""
        return list(jobs[self.rank :: self.world_size])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def device(self, requested: str) -> str:
        """One GPU per local rank when CUDA is used under torchrun."""
        if self.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested


def init_ranks() -> Ranks:
    """Read torchrun's environment and join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        # ranks wait at barriers while others train whole members (StarSSE's member 1, a
        # SharpBalance phase), far longer than the default 30-minute collective timeout
        dist.init_process_group(backend=backend, timeout=timedelta(hours=24))
    return Ranks(rank=rank, world_size=world, local_rank=local)
