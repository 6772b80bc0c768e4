"""Process-group setup from the launcher's environment (torchrun and the deepspeed launcher both set
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and the few collectives the trainer needs."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup() -> Placement:
    """Joins the process group the launcher describes (NCCL on GPUs, gloo on CPU); one process
    without a launcher needs no group. DeepSpeed adopts this group in its own initialization."""
    world_size = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # Imported while no group exists: torch.distributed.nn's functions take the default group as a
        # default argument, bound when the module is first imported (DDP, FSDP2 and checkpointing import
        # it). Bound after init_process_group, it keeps the group alive past destroy_process_group, and
        # its threads are torn down at interpreter exit, where that can abort the process.
        importlib.import_module("torch.distributed.nn")

        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Placement(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> bool:
    """Leaves the process group after a finished run, so its threads end before the interpreter exits
    (not after a failure: a rank that raised may leave the others inside a collective). Returns
    whether there was one."""
    if not dist.is_initialized():
        return False
    dist.destroy_process_group()
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(value: torch.Tensor) -> float:
    """The mean of a scalar over ranks (the global loss when each rank's loss is its share's mean)."""
    value = value.detach().float().reshape(1).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def broadcast_object(value, source: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]
