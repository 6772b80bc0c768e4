"""The trainer's view of the bundled data: whole splits in memory (uint8 images, captions, metadata)
and the data order as a function of (seed, step), which makes resuming exact."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from mmfast.data import ShardPairs, write_shards


SYNTH_FORMAT = 2  # bumped when the generator changes, so older shards on disk are rewritten


def ensure_synth(data, progress: bool = True) -> None:
    """Writes the bundled shards into data.synth_dir unless the same ones are there (call on one rank)."""
    marker = os.path.join(data.synth_dir, "synth.json")
    wanted = {"format": SYNTH_FORMAT, "train": data.train_samples, "held_out": data.held_out_samples, "size": data.image_size,
              "seed": data.seed, "digit_fraction": data.digit_fraction}
    if os.path.exists(marker) and json.load(open(marker)) == wanted:
        return
    write_shards(data.synth_dir, train=data.train_samples, held_out=data.held_out_samples, size=data.image_size,
                 seed=data.seed, digit_fraction=data.digit_fraction, progress=progress)
    with open(marker, "w") as handle:
        json.dump(wanted, handle)


def load_split(data, split: str):
    """(uint8 images [N, 3, H, W], captions, metas) of a split; corrupt samples are skipped and reported."""
    shards = sorted(os.path.join(data.synth_dir, name) for name in os.listdir(data.synth_dir)
                    if name.startswith(split + "-") and name.endswith(".tar"))
    dataset = ShardPairs(shards)
    images, captions, metas = [], [], []
    for image, caption, meta in dataset:
        images.append(np.asarray(image))
        captions.append(caption)
        metas.append(meta)
    if dataset.skipped:
        print(f"mmfast train: skipped {dataset.skipped} samples of {split}: {dict(dataset.problems)}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions, metas


def batch_indices(step: int, size: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: one permutation per epoch, a function of (seed, step) only."""
    per_epoch = max(1, size // batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * batch:(position + 1) * batch]
