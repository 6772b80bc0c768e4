"""Streaming webdataset shards for datasets beyond memory (data.streaming=true).

Each rank reads its own shards and each DataLoader worker its own share of those, in an order
drawn per pass from (seed, pass); a shuffle buffer mixes samples across shards; passes repeat, so
every rank always has a batch to contribute. Corrupt samples are skipped; each worker reports its
count at the end of a pass. Resuming restores model, optimizer, schedule and RNG, but the stream
restarts at a pass drawn from the resume step rather than replaying the exact samples."""
from __future__ import annotations

import random
from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmfast.data import ShardPairs
from mmfast.data.pairs import SYNTHETIC_CAPTION, TruncatedShard, tar_samples
from mmfast.data.preprocess import Preprocess


class ShardStream(IterableDataset):
    def __init__(self, shards: list[str], rank: int, world_size: int, image_size: int, seed: int,
                 shuffle_buffer: int, synthetic_captions: float = 0.0):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.synthetic_captions = synthetic_captions
        self.preprocess, self.seed, self.shuffle_buffer = Preprocess(image_size), seed, shuffle_buffer

    def _my_shards(self, order: list[str]) -> list[str]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        readers, reader = self.world_size * workers, self.rank * workers + worker_id
        mine = order[reader::readers]
        return mine or [order[reader % len(order)]]  # fewer shards than readers: share some

    def __iter__(self):
        worker = get_worker_info()
        generator = random.Random(self.seed * 7919 + self.rank * 131 + (worker.id if worker else 0))
        buffer, passes = [], 0
        while True:
            order = sorted(self.shards)
            random.Random(self.seed * 100003 + passes).shuffle(order)
            pairs = ShardPairs(self._my_shards(order))
            for image, caption, meta in pairs:
                if "synthetic_caption" in meta and generator.random() < self.synthetic_captions:
                    caption = meta["synthetic_caption"]
                buffer.append((self.preprocess(image), caption))
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(generator.randrange(len(buffer)))
            if pairs.skipped:
                print(f"mmfast train: rank {self.rank} skipped {pairs.skipped} samples: {dict(pairs.problems)}",
                      flush=True)
            passes += 1


def _collate(samples):
    return torch.stack([image for image, _ in samples]), [caption for _, caption in samples]


def stream_batches(shards: list[str], batch: int, rank: int, world_size: int, image_size: int, seed: int,
                   shuffle_buffer: int = 1000, workers: int = 2, synthetic_captions: float = 0.0):
    """An endless iterator of (uint8 images [batch, 3, S, S], captions) for this rank."""
    dataset = ShardStream(shards, rank, world_size, image_size, seed, shuffle_buffer, synthetic_captions)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=_collate,
                        persistent_workers=workers > 0)
    return iter(loader)


def sample_captions(shards: list[str], limit: int) -> list[str]:
    """Up to `limit` captions read straight from the shards' .txt and synthetic.txt members (to train
    the tokenizer)."""
    captions, problems = [], Counter()
    for path in sorted(shards):
        try:
            for _, sample in tar_samples(path):
                for name in ("txt", SYNTHETIC_CAPTION):
                    if name in sample:
                        try:
                            captions.append(sample[name].decode("utf-8"))
                        except UnicodeDecodeError:
                            problems["caption not UTF-8"] += 1
                if len(captions) >= limit:
                    return captions
        except TruncatedShard as error:
            problems[f"truncated shard {error}"] += 1
    if problems:
        print(f"mmfast train: tokenizer captions: skipped {dict(problems)}")
    return captions
