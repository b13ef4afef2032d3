"""torchrun ranks: independent jobs sharded across them, and one model trained data-parallel.

Under ``torchrun --nproc-per-node N`` every rank runs the same command. Independent jobs
(children, pool policies, cycles): each rank takes the jobs ``i`` with ``i % world_size ==
rank``, and rank 0 alone writes shared files (the manifest) after a barrier. One model (the
parent): every rank takes its rows of each global batch (:class:`RankShard`) and
``DistributedDataParallel`` sums the gradients weighted by the rows each rank had, so the
update is the single-process one for the same global batch. Without torchrun it is one rank
of one and nothing is initialised. The same path runs on CPU with the gloo backend, which is
how it is tested.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Ranks", "init_ranks", "RankShard", "data_parallel"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's ranks; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes shared files and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one rank."""
        return self.world_size > 1

    def shard(self, jobs: Sequence[T]) -> list[T]:
        """This rank's share of ``jobs``: every ``world_size``-th, starting at ``rank``."""
        return list(jobs[self.rank :: self.world_size])

    def barrier(self) -> None:
        """Wait until every rank gets here; nothing to wait for in a single process."""
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
        timeout = timedelta(hours=24)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # torchrun keeps one store across an elastic restart, and the restarted group's
            # gloo would connect to the addresses the killed attempt left in it (connection
            # refused, measured with torch 2.14): each attempt gets keys of its own
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"pat-attempt-{attempt}", store),
                                    rank=rank, world_size=world, timeout=timeout)
    return Ranks(rank=rank, world_size=world, local_rank=local)


class RankShard:
    """This rank's rows of every global batch of ``loader`` (rows ``rank``, ``rank + world``, ...).

    ``share`` is the fraction of the current global batch those rows are: the weight of this
    rank's mean-loss gradient in the all-reduce (:func:`data_parallel`), so a last batch that
    does not split evenly still gives the single-process gradient.
    """

    def __init__(self, loader: Iterable[tuple[Tensor, Tensor]], ranks: Ranks) -> None:
        self.loader, self.ranks, self.share = loader, ranks, 1.0 / ranks.world_size

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the wrapped loader, if it reshuffles by epoch."""
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        rank, world = self.ranks.rank, self.ranks.world_size
        for x, y in self.loader:
            mine = y[rank::world]
            if not len(mine):
                raise RuntimeError(f"a batch of {len(y)} has no rows for rank {rank} of {world}; "
                                   "use a batch size of at least the number of ranks")
            self.share = len(mine) / len(y)
            yield x[rank::world].contiguous(), mine.contiguous()


def _weighted_allreduce(shard, bucket):  # noqa: ANN001 (DDP checks a hook's annotations as objects, not strings)
    tensor = bucket.buffer().mul_(shard.share)  # this rank's mean gradient x its share of rows
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


def data_parallel(model: nn.Module, shard: RankShard, device: torch.device) -> DistributedDataParallel:
    """``model`` wrapped for data-parallel training on ``shard``'s rows (see :class:`RankShard`)."""
    ids: Any = [device.index] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=ids)
    wrapped.register_comm_hook(shard, _weighted_allreduce)
    return wrapped


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (returned as they are without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
