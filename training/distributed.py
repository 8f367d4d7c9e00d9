"""Multi-process training through torchrun (DistributedDataParallel).

``torchrun --nproc_per_node=N -m training train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; each process then trains on its shard of every epoch (DistributedSampler)
and DDP averages gradients. NCCL on CUDA, gloo on the CPU. Rank 0 alone pushes, trains
the last layer, evaluates and writes files; the others receive its parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from protopnet.errors import ProtoPNetError


class DistributedError(ProtoPNetError):
    """A torchrun launch this machine cannot serve (e.g. more GPU processes than GPUs)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ddp_cuda_device(local_rank: int, gpus: int) -> torch.device:
    """The GPU of this DDP process: one per process on each node. More processes than
    GPUs is a clear error here rather than CUDA's "invalid device ordinal" later."""
    if local_rank >= gpus:
        raise DistributedError(
            f"DDP on CUDA needs one GPU per process: this is local rank {local_rank} but the "
            f"node has {gpus} GPU(s); start torchrun with --nproc_per_node={gpus}, or train on "
            "the CPU (--set train.device=cpu, gloo)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(cuda: bool) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op otherwise.

    ``cuda``: whether the run trains on GPUs (NCCL, one GPU per process). A run on the
    CPU uses gloo and leaves CUDA alone, also on a machine that has fewer GPUs than
    processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(ddp_cuda_device(local, torch.cuda.device_count()))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Every parameter and buffer from rank 0 to the others (after push, last layer)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def broadcast_object(obj: object, info: DistInfo) -> object:
    """A small JSON-able object from rank 0 (e.g. whether to stop)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
