"""The engine interface, and the single-process engine (CPU or one GPU) the others extend.

An engine owns the placement of the model, the optimizer and the schedule: the trainer calls
`prepare(model)` once, then per optimizer step `backward(loss, sync)` for each accumulated
batch and `step()`; `save`/`load` write and read a checkpoint folder (collectively), and
`evaluation_model()` returns, on rank 0, a plain module with the current weights."""
from __future__ import annotations

import contextlib
import math
import os

import torch

from mmfast.train.files import load_tensors
from mmfast.train.distributed import Placement

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, embeddings' scale or the logit scale)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


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
    gradient scaler, CUDA only)."""

    name = "single"
    precisions = ("fp32", "bf16", "fp16")

    def __init__(self, config, placement: Placement):
        self.config, self.placement = config, placement
        self.engine, self.optim = config.engine, config.optim
        self.accumulation = config.train.accumulation_steps
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
        self.model = self.module = model
        self.optimizer = build_optimizer(parameter_groups(model, self.optim.weight_decay), self.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(self.optim, self.config.train.steps))
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
        parameters = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.optim.grad_clip or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2

    def set_learning_rate(self, lr: float) -> None:
        """After a resume that changes optim.lr: the restored schedule continues from the new peak."""
        ratio = lr / self.scheduler.base_lrs[0]
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
        for group in self.scheduler.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] *= ratio

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- checkpoints and evaluation ------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Writes model, optimizer, schedule (and scaler) into `folder` (one file, rank 0)."""
        if self.placement.is_main:
            os.makedirs(folder, exist_ok=True)
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict()}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, os.path.join(folder, "state.pt"))

    def load(self, folder: str) -> None:
        state = load_tensors(os.path.join(folder, "state.pt"), map_location=self.placement.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def evaluation_model(self) -> torch.nn.Module | None:
        """On rank 0, a module with the current weights for evaluation (None on the other ranks)."""
        return self.module if self.placement.is_main else None
