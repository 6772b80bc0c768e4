"""What the training loop asks of a paradigm. The loop (mmfast.train.trainer) owns the engines,
accumulation, schedule, progress bar, metrics, checkpoints, resume and the run directory; a task
owns everything paradigm-specific: its checks, data and tokenizer, the model, one rank's batches,
the loss, what it logs, its FLOPs, evaluation and export."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import torch

from mmfast.train import checkpoint


class Task:
    """Base class of a task. `config` is the RunConfig; `placement` the rank's place (rank, world size,
    device, is_main; None outside a run, e.g. when exporting)."""

    name = ""
    headline: dict = {}  # evaluation key -> label, shown by the progress bar after each evaluation
    plot_metrics: dict = {}  # evaluation key -> label, drawn in curves.png (keys with "loss" beside the loss)

    def __init__(self, config, placement=None):
        self.config, self.placement = config, placement

    def check(self, world_size: int) -> None:
        """Refuse settings this task cannot train with (a ValueError naming the key)."""

    def prepare(self, progress: bool) -> None:
        """Data and tokenizer of the run: rank 0 writes into config.run_dir, then every rank reads
        (the loop has made the directory and synchronizes around this call's collectives)."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        """The single-device model, on the CPU, initialized from the current torch seed."""
        raise NotImplementedError

    def initial_weights(self, model: torch.nn.Module, saved: dict) -> None:
        """train.init_from: the contents of a model.pt (a previous stage's) into the new model."""
        model.load_state_dict(saved["state_dict"])

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train, after its initial weights and train.trainable: by default itself; a task
        adds its adapters here (LoRA), trainable whatever train.trainable says."""
        return model

    def batches(self, accumulation: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """This rank's share of every global batch from step `start` on, a function of (seed, step):
        a tuple of tensors whose first dimension is split into `accumulation` micro-batches."""
        raise NotImplementedError

    def loss(self, model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The float32 loss of one micro-batch through `model` (the engine's wrapped model), called
        inside engine.autocast(): what must stay float32 runs under torch.autocast(..., enabled=False)."""
        raise NotImplementedError

    def forward_backward(self, engine, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Gradients of one optimizer step on this rank; returns its mean loss (detached)."""
        losses = []
        parts = list(zip(*(tensor.chunk(engine.accumulation) for tensor in batch)))
        for index, part in enumerate(parts):
            with engine.autocast():
                loss = self.loss(engine.wrapped, part)
            engine.backward(loss, sync=index == len(parts) - 1)
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def log(self, engine) -> dict:
        """Extra training metrics, read through the engine (engine.full_value(parameter) is collective
        on sharding engines: every rank calls log)."""
        return {}

    def flops_per_sample(self) -> float:
        """Training FLOPs of one sample (forward + backward), for TFLOP/s and MFU."""
        raise NotImplementedError

    def tokens_per_sample(self) -> int:
        raise NotImplementedError

    def evaluate(self, model) -> dict:
        """Scores of a plain (unwrapped, consolidated) model on rank 0."""
        raise NotImplementedError

    def restore(self, run_dir: str) -> None:
        """What prepare() made that export and loading need (tokenizer, model config), read back from
        a run directory, without data or a process group."""
        raise NotImplementedError

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """The finished model from the contents of its model.pt (written by export; `directory` holds
        it and the files beside it), in eval mode, with what a user needs with it (a tokenizer)."""
        raise NotImplementedError

    def prepare_evaluation(self, progress: bool) -> None:
        """What evaluate() needs of the data, for a finished run (`mmfast eval`); by default prepare()."""
        self.prepare(progress)

    config_key = ""  # where export writes the model's config in model.pt

    def export(self, run_dir: str, folder: str) -> str:
        """Writes the finished model of checkpoint `folder` into run_dir; returns its path. By default
        <run_dir>/model.pt: the task's name, its model config (self.model_config, under config_key) and
        the consolidated fp32 weights, and the task's saved_extras()."""
        path = os.path.join(run_dir, "model.pt")
        torch.save({"task": self.name, self.config_key: dataclasses.asdict(self.model_config),
                    "state_dict": checkpoint.consolidate(folder), **self.saved_extras()}, path)
        return path

    def saved_extras(self) -> dict:
        """What else the default export writes into model.pt."""
        return {}
