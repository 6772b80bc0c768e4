"""The engine interface, and the single-process engine (CPU or one GPU) the others extend.

An engine owns the placement of the model, the optimizer and the schedule: the trainer calls
`prepare(model)` once, then per optimizer step `backward(loss, sync)` for each accumulated
batch and `step()`; `save`/`load` write and read a checkpoint folder (collectively), and
`evaluation_model()` returns, on rank 0, a plain module with the current weights."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from mmfast.train.files import load_tensors
from mmfast.train.distributed import Placement

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Geometry:
    """What an engine needs of the run beyond its own sections: the schedule's length and how each
    optimizer step's global batch is split (over ranks, then into accumulated batches)."""

    steps: int
    global_batch: int
    accumulation: int = 1

    @classmethod
    def of_run(cls, config) -> "Geometry":
        return cls(config.train.steps, config.data.batch_size, config.train.accumulation_steps)


def schedule(optim, steps: int):
    """The learning-rate factor of step `step`: linear warmup, then cosine, linear or constant."""
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps)
        if optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1 - progress) if optim.schedule == "linear" else 1.0
    return factor


def _prefixed(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def parameter_groups(module: torch.nn.Module, weight_decay: float, lr_groups: dict | None = None) -> list[dict]:
    """The trainable parameters in optimizer groups: weight decay on matrices only (not on norms,
    biases, embeddings' scale or the logit scale), and a group of its own, with its own peak lr, for
    each prefix of `lr_groups` ({parameter-name prefix: lr}; the longest matching prefix wins)."""
    lr_groups = lr_groups or {}
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    for prefix in lr_groups:
        if not any(_prefixed(name, prefix) for name, _ in named):
            raise ValueError(f"config: optim.lr_groups names {prefix!r}, which no trainable parameter starts with; "
                             f"the model's top-level modules: {sorted({n.split('.')[0] for n, _ in named})}")
    groups = {}
    for name, parameter in named:
        prefix = max((p for p in lr_groups if _prefixed(name, p)), key=len, default=None)
        decay = parameter.dim() >= 2
        group = groups.setdefault((prefix, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                    **({"lr": lr_groups[prefix], "lr_group": prefix} if prefix else {})})
        group["params"].append(parameter)
    # without lr_groups: [decayed, not decayed], the layout of optimizer states in earlier checkpoints
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0] is not None, key[0] or "", not key[1]))]


def freeze(model: torch.nn.Module, trainable=(), frozen=()) -> None:
    """requires_grad off for parameters under a `frozen` prefix, or outside every `trainable` prefix
    when any is given; a prefix that names no parameter is an error naming the key."""
    names = [name for name, _ in model.named_parameters()]
    for key, prefixes in (("train.trainable", trainable), ("train.frozen", frozen)):
        for prefix in prefixes:
            if not any(_prefixed(name, prefix) for name in names):
                raise ValueError(f"config: {key} names {prefix!r}, which no parameter starts with; the model's "
                                 f"top-level modules: {sorted({name.split('.')[0] for name in names})}")
    for name, parameter in model.named_parameters():
        if (trainable and not any(_prefixed(name, p) for p in trainable)) or any(_prefixed(name, p) for p in frozen):
            parameter.requires_grad_(False)


def frozen_towers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{dotted name: module} of the model's towers (its `towers()`, where it has one) that hold no
    trainable parameter. The engines that shard parameters (FSDP2, ZeRO-3) keep these whole on every
    rank in the run's precision: a frozen tower is only read, so partitioning it would buy its memory
    back with a gather of every one of its layers at every step (LLaVA's frozen vision tower, a locked
    tower as in LiT)."""
    towers = model.towers() if hasattr(model, "towers") else {}
    return {name: tower for name, tower in towers.items()
            if not any(parameter.requires_grad for parameter in tower.parameters())}


def tower_weights(towers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The towers' weights under the model's own keys (what a state dict of the whole model has)."""
    return {f"{name}.{key}": value for name, tower in towers.items() for key, value in tower.state_dict().items()}


def load_tower_weights(towers: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    """tower_weights' inverse: each tower takes its keys of `state`."""
    for name, tower in towers.items():
        tower.load_state_dict({key[len(name) + 1:]: value for key, value in state.items()
                               if key.startswith(name + ".")})


def build_optimizer(groups: list[dict], optim) -> torch.optim.Optimizer:
    options = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, **options)
    if optim.name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as error:
            raise ImportError("optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from error
        return bitsandbytes.optim.AdamW8bit(groups, **options)
    raise ValueError(f"config: optim.name must be 'adamw' or 'adamw8bit', got {optim.name!r}")


class Engine:
    """One process: the model on the launcher's device, autocast for bf16/fp16 (fp16 with a
    gradient scaler, CUDA only). After prepare(): `wrapped` is what forward and backward go through
    (DDP, DeepSpeed's engine, the FSDP2-sharded model), `unwrapped` the task's own module (its
    parameters may be sharded: read them with full_value)."""

    name = "single"
    precisions = ("fp32", "bf16", "fp16")

    def __init__(self, engine, optim, geometry: Geometry, placement: Placement):
        """`engine` and `optim` are the run's sections of those names (EngineConfig, OptimConfig)."""
        self.engine, self.optim, self.geometry, self.placement = engine, optim, geometry, placement
        self.accumulation = geometry.accumulation
        if self.engine.precision not in self.precisions:
            raise ValueError(f"config: engine.precision must be one of {self.precisions} with engine {self.name!r}, "
                             f"got {self.engine.precision!r}")
        if self.engine.precision == "fp16" and placement.device.type != "cuda":
            raise ValueError("config: engine.precision=fp16 needs a CUDA device; use bf16 on the CPU")
        self.dtype = PRECISIONS[self.engine.precision]

    # -- setup -------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> None:
        """Places `model` (the task's; it has blocks() and set_grad_checkpointing()), builds the optimizer
        and the schedule."""
        model.to(self.placement.device)
        self._common_setup(model)
        self.wrapped = self.unwrapped = model
        groups = parameter_groups(model, self.optim.weight_decay, self.optim.lr_groups)
        self.optimizer = build_optimizer(groups, self.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(self.optim, self.geometry.steps))
        self.scaler = torch.amp.GradScaler("cuda") if self.engine.precision == "fp16" else None

    def _common_setup(self, model: torch.nn.Module) -> None:
        if self.engine.activation_checkpointing:
            model.set_grad_checkpointing(True)
        if self.engine.compile:
            for block in model.blocks():
                block.compile()  # per block: works under DDP, FSDP2 and DeepSpeed alike

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.placement.device.type, dtype=self.dtype)

    # -- one optimizer step ------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backpropagates one of `accumulation` batches; `sync` is False for all but the last."""
        loss = loss / self.accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        """Clips, steps the optimizer and the schedule, clears gradients; returns the gradient norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = self._clip()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _clip(self) -> float:
        parameters = [p for p in self.unwrapped.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.optim.grad_clip or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2

    def set_learning_rate(self, lr: float) -> None:
        """After a resume that changes optim.lr: the restored schedule continues from the new peak."""
        groups = self.scheduler.optimizer.param_groups
        default = [index for index, group in enumerate(groups) if "lr_group" not in group]
        ratio = lr / self.scheduler.base_lrs[default[0]] if default else 1.0
        # the groups of optim.lr_groups keep their own peaks; the others follow optim.lr
        for index in default:
            self.scheduler.base_lrs[index] = lr
            groups[index]["initial_lr"] = lr
            groups[index]["lr"] *= ratio

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- checkpoints and evaluation ------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Writes model, optimizer, schedule (and scaler) into `folder` (one file, rank 0)."""
        if self.placement.is_main:
            os.makedirs(folder, exist_ok=True)
            state = {"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict()}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, os.path.join(folder, "state.pt"))

    def load(self, folder: str) -> None:
        state = load_tensors(os.path.join(folder, "state.pt"), map_location=self.placement.device)
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def evaluation_model(self) -> torch.nn.Module | None:
        """On rank 0, a module with the current weights for evaluation (None on the other ranks)."""
        return self.unwrapped if self.placement.is_main else None

    # -- what the loop and the tasks may ask, whatever the engine ---------------------------------
    def no_sync(self):
        """A context in which backward does not reduce gradients across ranks (gradient caching's
        micro-batches but the last)."""
        return contextlib.nullcontext()

    def full_value(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        """The whole (unsharded) value of one parameter of `module`; collective on sharding engines,
        so every rank calls it."""
        return parameter.detach()

    def write_files(self, run_dir: str) -> None:
        """The engine's own files in the run directory (rank 0), e.g. DeepSpeed's resolved config."""
