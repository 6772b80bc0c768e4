"""What the caption-based tasks share: the image-caption splits and the caption tokenizer of a run."""
from __future__ import annotations

import os

import torch

from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.train import distributed
from mmfast.data.mixture import Mixture, mixture_probabilities
from mmfast.data.splits import batch_indices, ensure_synth, load_sources, load_split, other_split, shard_paths
from mmfast.data.stream import sample_captions


def prepare_captions(task, progress: bool, with_other: bool = False, train: bool = True) -> None:
    """Sets task.train_split (None when streamed, or without `train`), task.held_out, task.other (the
    set drawn another way, rank 0, when `with_other`), task.mixture (data.sources: the sources' batches,
    else None) and, through task.restore, the tokenizer: trained on the captions (or loaded from
    data.tokenizer) and written once into the run directory by rank 0."""
    config, placement = task.config, task.placement
    if placement.is_main and config.data.source == "synth":
        ensure_synth(config.data, progress)
    distributed.barrier()
    task.train_split, task.mixture = None, None
    if train and config.data.sources:
        task.train_split, sizes = load_sources(config.data)
        probabilities = mixture_probabilities(sizes, config.data.mixture, config.data.mixture_temperature)
        task.mixture = Mixture(sizes, probabilities, config.data.batch_size, config.train.seed,
                               config.data.max_epochs)
    elif train and not config.data.streaming:
        task.train_split = load_split(config.data, "train")
    task.held_out = load_split(config.data, "held_out")
    task.other = other_split(config.data) if with_other and placement.is_main else None
    path = os.path.join(config.run_dir, "tokenizer.json")
    if placement.is_main and not os.path.exists(path):
        context = config.model.text.context_length
        if config.data.tokenizer:
            tokenizer = CaptionTokenizer.load(config.data.tokenizer, context)
        else:
            captions = (task.train_split[1] + [meta["synthetic_caption"] for meta in task.train_split[2]
                                               if "synthetic_caption" in meta] if task.train_split
                        else sample_captions(shard_paths(config.data, "train"), 20000))
            tokenizer = CaptionTokenizer.train(captions, config.model.text.vocab_size, context)
        tokenizer.save(path)
    distributed.barrier()
    task.restore(config.run_dir)


def check_captions_in_memory(config, task_name: str) -> None:
    """What a task that reads its captions into memory, in plain batches, refuses (named)."""
    if config.train.micro_batch:
        raise ValueError(f"config: train.micro_batch (gradient caching) is for contrastive batches; task {task_name} "
                         f"uses train.accumulation_steps")
    if config.data.streaming:
        raise ValueError(f"config: task {task_name} reads its captions into memory: data.streaming=false")


def global_rows(task, step: int, size: int):
    """The rows of the global batch of `step` in task.train_split: the mixture's, or one permutation of
    the split per epoch."""
    if task.mixture is not None:
        return task.mixture.rows(step)
    return batch_indices(step, size, task.config.data.batch_size, task.config.train.seed)


def mixture_log(task) -> dict:
    """Per source, samples seen and epochs (fractional) so far, when the run mixes sources."""
    return task.mixture.seen() if getattr(task, "mixture", None) is not None else {}


class CaptionChoice:
    """data.synthetic_captions: each step, a row with a synthetic caption beside its own trains on the
    synthetic one with that probability, drawn from (seed, step) and the row's place in the batch."""

    def __init__(self, tokenizer, captions: list[str], metas: list[dict], probability: float, seed: int):
        self.tokens = tokenizer(captions)
        synthetic = [meta.get("synthetic_caption") for meta in metas]
        self.has_synthetic = torch.tensor([caption is not None for caption in synthetic])
        self.probability, self.seed = probability, seed
        self.synthetic = (tokenizer([s if s is not None else c for s, c in zip(synthetic, captions)])
                          if probability > 0 and self.has_synthetic.any() else None)

    def __call__(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        if self.synthetic is None:
            return self.tokens[rows]
        draws = torch.rand(len(rows), generator=torch.Generator().manual_seed(self.seed * 1000003 + step + 11))
        chosen = (draws < self.probability) & self.has_synthetic[rows]
        return torch.where(chosen[:, None], self.synthetic[rows], self.tokens[rows])
