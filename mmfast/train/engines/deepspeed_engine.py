"""DeepSpeed ZeRO stages 1, 2 and 3 (optimizer state, + gradients, + parameters sharded), with the
optimizer (and at stage 3 the parameters) optionally offloaded to the CPU.

The optimizer is ours (torch AdamW or bitsandbytes' 8-bit AdamW) except with offload, where
DeepSpeed's CPU Adam runs the step (compiled by DeepSpeed on first use, about a minute). The
schedule is handed to DeepSpeed, which steps and checkpoints it."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import socket

import torch
import torch.distributed as dist

from mmfast.train.engines.base import (Engine, build_optimizer, frozen_towers, load_tower_weights, parameter_groups,
                                       schedule, tower_weights)
from mmfast.train.files import load_tensors

TOWERS_FILE = "towers.pt"


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the first import: DeepSpeed picks it then
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError("engine.name=deepspeed needs DeepSpeed: pip install 'mmfast[deepspeed]'") from error
    return deepspeed


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def out_of_sight(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
    """Unregisters `modules` (dotted names of submodules of `model`) from their parents but leaves each
    as a plain attribute: the forward still calls it, while parameters(), state_dict() and module hooks,
    all that DeepSpeed partitions, gathers and saves, no longer reach it."""
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent)
        del parent._modules[leaf]
        object.__setattr__(parent, leaf, module)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, engine, optim, geometry, placement):
        super().__init__(engine, optim, geometry, placement)
        stage = self.engine.zero_stage
        if stage not in (1, 2, 3):
            raise ValueError(f"config: engine.zero_stage must be 1, 2 or 3, got {stage!r}")
        if self.engine.offload_parameters and stage != 3:
            raise ValueError(f"config: engine.offload_parameters needs engine.zero_stage=3, got {stage}")

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config this run uses (written to the run directory as deepspeed.json)."""
        engine, optim, world = self.engine, self.optim, self.placement.world_size
        global_batch = self.geometry.global_batch
        zero = {"stage": engine.zero_stage}
        if engine.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if engine.offload_parameters:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config = {
            "train_batch_size": global_batch,
            "train_micro_batch_size_per_gpu": global_batch // (world * self.accumulation),
            "gradient_accumulation_steps": self.accumulation,
            "gradient_clipping": optim.grad_clip or 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": engine.precision == "bf16"},
            "fp16": {"enabled": engine.precision == "fp16"},
            "zero_allow_untested_optimizer": True,  # our AdamW / 8-bit AdamW as client optimizers
            "steps_per_print": 10 ** 9,
        }
        if engine.offload_optimizer and optim.name == "adamw":
            config["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2],
                                                               "eps": optim.eps, "weight_decay": optim.weight_decay}}
        return config

    def prepare(self, model: torch.nn.Module) -> None:
        deepspeed = import_deepspeed()
        if not dist.is_initialized():  # one process: DeepSpeed still wants a process group
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                               ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        model.to(self.placement.device)
        self._common_setup(model)
        self.evaluation_copy = copy.deepcopy(model) if self.placement.is_main else None
        config = self.deepspeed_config()
        groups = parameter_groups(model, self.optim.weight_decay, self.optim.lr_groups)
        client_optimizer = None if "optimizer" in config else build_optimizer(groups, self.optim)
        factor = schedule(self.optim, self.geometry.steps)
        self.towers = frozen_towers(model) if self.engine.zero_stage == 3 else {}
        out_of_sight(model, self.towers)
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=client_optimizer, config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor))
        for tower in self.towers.values():
            tower.to(self.dtype)  # DeepSpeed holds the rest in the run's precision
        if self.engine.zero_stage == 3 and hasattr(model, "external_parameters"):
            for parameter in model.external_parameters():  # read as tensors, not through their module's call
                deepspeed.zero.register_external_parameter(model, parameter)
        self.unwrapped = self.wrapped.module
        self.scaler = None

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed holds the model in bf16/fp16 itself

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self.wrapped.backward(loss)  # divides by gradient_accumulation_steps itself
        if not sync:
            self.wrapped.step()  # counts the micro step; DeepSpeed steps only at the boundary

    def step(self) -> float:
        self.wrapped.step()
        norm = self.wrapped.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: str) -> None:
        self.wrapped.save_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))
        if self.towers and self.placement.is_main:
            torch.save(tower_weights(self.towers), os.path.join(folder, TOWERS_FILE))

    def load(self, folder: str) -> None:
        path, _ = self.wrapped.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")
        if self.towers:
            load_tower_weights(self.towers, load_tensors(os.path.join(folder, TOWERS_FILE),
                                                         map_location=self.placement.device))

    def evaluation_model(self) -> torch.nn.Module | None:
        if self.engine.zero_stage == 3:
            state = self.wrapped._zero3_consolidated_16bit_state_dict()  # collective; the full dict on rank 0
            state = {**state, **tower_weights(self.towers)} if state is not None else None
        else:
            state = self.unwrapped.state_dict() if self.placement.is_main else None
        if not self.placement.is_main:
            return None
        self.evaluation_copy.load_state_dict({key: value.float() for key, value in state.items()})
        return self.evaluation_copy

    def full_value(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        if not hasattr(parameter, "ds_numel"):  # not partitioned (ZeRO-1/2)
            return parameter.detach()
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters([parameter]):  # ZeRO-3: gathered on every rank
            return parameter.detach().clone()

    def write_files(self, run_dir: str) -> None:
        with open(os.path.join(run_dir, "deepspeed.json"), "w") as handle:
            json.dump(self.deepspeed_config(), handle, indent=1)
