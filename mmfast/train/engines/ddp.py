"""PyTorch DistributedDataParallel: every rank holds the whole model and optimizer; gradients are
averaged in buckets during backward."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from mmfast.train.engines.base import Engine


class DDPEngine(Engine):
    name = "ddp"

    def prepare(self, model: torch.nn.Module) -> None:
        super().prepare(model)
        device_ids = [self.placement.device.index] if self.placement.device.type == "cuda" else None
        self.wrapped = DistributedDataParallel(model, device_ids=device_ids)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # DDP's no_sync covers the backward only: accumulated batches skip the all-reduce
        with contextlib.nullcontext() if sync else self.wrapped.no_sync():
            super().backward(loss, sync)

    def no_sync(self):
        return self.wrapped.no_sync()
