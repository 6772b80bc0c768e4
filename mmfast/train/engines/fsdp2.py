"""PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks,
each transformer block a unit that is gathered for its forward and backward.
Mixed precision is FSDP2's policy (bf16 compute, fp32 gradient reduction and master weights).
A frozen tower (engines.base.frozen_towers) is left out of the sharding: whole on every rank."""
from __future__ import annotations

import copy
import inspect
import os

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from mmfast.train.files import load_tensors
from mmfast.train.engines.base import Engine, build_optimizer, frozen_towers, parameter_groups, schedule


class FSDP2Engine(Engine):
    name = "fsdp2"
    precisions = ("fp32", "bf16")

    def __init__(self, engine, optim, geometry, placement):
        super().__init__(engine, optim, geometry, placement)
        if self.optim.name != "adamw":
            raise ValueError(f"config: optim.name={self.optim.name!r} does not take FSDP2's DTensor parameters; "
                             "use adamw, or engine.name=deepspeed / ddp")

    def prepare(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        model.to(self.placement.device)
        self._common_setup(model)
        # the evaluation copy is plain: rank 0 loads gathered weights into it
        self.evaluation_copy = copy.deepcopy(model) if self.placement.is_main else None
        options = {}
        if self.dtype != torch.float32:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        if self.engine.offload_optimizer:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=self.placement.device.type == "cuda")
        # torch < 2.7's fully_shard has no ignored_params: there the frozen towers are sharded like the rest
        towers = frozen_towers(model) if "ignored_params" in inspect.signature(fully_shard).parameters else {}
        whole = {parameter for tower in towers.values() for parameter in tower.parameters()}
        for block in model.blocks():
            if not any(parameter in whole for parameter in block.parameters()):
                fully_shard(block, **options)
        fully_shard(model, **options, **({"ignored_params": whole} if whole else {}))
        for tower in towers.values():
            tower.to(self.dtype)  # outside FSDP2's policy: held in the precision the rest computes in
        self.wrapped = self.unwrapped = model
        # after fully_shard: the optimizer must see the sharded (DTensor) parameters
        groups = parameter_groups(model, self.optim.weight_decay, self.optim.lr_groups)
        self.optimizer = build_optimizer(groups, self.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(self.optim, self.geometry.steps))
        self.scaler = None

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self.wrapped.set_requires_gradient_sync(sync)
        super().backward(loss, sync)

    def save(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = get_state_dict(self.wrapped, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(folder, "sharded"))
        if self.placement.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, os.path.join(folder, "scheduler.pt"))

    def load(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = get_state_dict(self.wrapped, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(folder, "sharded"))
        set_state_dict(self.wrapped, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        scheduler = load_tensors(os.path.join(folder, "scheduler.pt"))
        self.scheduler.load_state_dict(scheduler["scheduler"])

    def evaluation_model(self) -> torch.nn.Module | None:
        full = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.placement.is_main:
            return None
        self.evaluation_copy.load_state_dict(full)
        return self.evaluation_copy

    def full_value(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        value = parameter.detach()
        return value.full_tensor() if hasattr(value, "full_tensor") else value  # a DTensor: all-gathered
