"""Can a vision tower of the main job's size learn shapes that carry over to pictures drawn another
way, in the main job's budget? A supervised check (shape labels, no text), to tell the tower's limits
from the contrastive objective's (see the README, "The main job: numbers").

    python benchmarks/shape_learning.py p8-stride4 p8-stride8 --steps 300
    python benchmarks/shape_learning.py clip-p8-stride4 --steps 200   # mmfast's CLIP vision tower itself

Trains each named tower (the CLIP blocks, uint8 pixels through the fused patch embedding) on the
bundled generator's `continuous` pictures (20,000; cached under /tmp), then prints its shape accuracy
on 2,000 held-out pictures and on the 648 of mmfast.data.other_renderer, per background band.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmfast.data import synth
from mmfast.data.other_renderer import other_renderer_set
from mmfast.models.clip import Block, VisionConfig, VisionTransformer
from mmfast.ops import patch_embed
from mmfast.train.tasks.contrastive import CLIP_MEAN, CLIP_STD

TOWERS = {  # patch, stride, pooling (the class token or the mean of the patch rows)
    "p8-stride8": (8, 8, "class"), "p8-stride8-mean": (8, 8, "mean"), "p8-stride6": (8, 6, "class"),
    "p12-stride5": (12, 5, "class"), "p8-stride4": (8, 4, "class"), "p8-stride4-mean": (8, 4, "mean"),
    "clip-p8-stride4": (8, 4, "clip"),  # mmfast.models.clip.VisionTransformer itself, as the main job builds it
}


def pictures(split: str, count: int, size: int):
    images, shapes = [], []
    for index in range(count):
        sample = synth.generate(index, split, 0, size, 0.0, None, "continuous")
        images.append(torch.from_numpy(np.asarray(sample.image).copy()).permute(2, 0, 1))
        shapes.append(synth.SHAPES.index(sample.meta["shape"]))
    return torch.stack(images), torch.tensor(shapes)


class ClipTower(nn.Module):
    """The CLIP model's vision tower with a shape head on its class token."""

    def __init__(self, size: int, patch: int, stride: int, _pooling: str, width=128, layers=4, heads=4):
        super().__init__()
        self.vision = VisionTransformer(VisionConfig(image_size=size, patch_size=patch, patch_stride=stride,
                                                     width=width, layers=layers, heads=heads, mean=CLIP_MEAN,
                                                     std=CLIP_STD), "gelu")
        self.head = nn.Linear(width, len(synth.SHAPES))

    def forward(self, pixels):
        return self.head(self.vision(pixels))


class Tower(nn.Module):
    def __init__(self, size: int, patch: int, stride: int, pooling: str, width=128, layers=4, heads=4):
        super().__init__()
        self.stride, self.pooling = stride, pooling
        grid = (size - patch) // stride + 1
        self.weight = nn.Parameter(torch.randn(width, 3, patch, patch) * (3 * patch * patch) ** -0.5)
        self.positions = nn.Parameter(torch.randn(grid * grid + 1, width) * 0.02)
        self.class_token = nn.Parameter(torch.randn(width) * 0.02)
        self.pre_norm, self.post_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, heads, 4.0, False, "gelu", None) for _ in range(layers))
        self.head = nn.Linear(width, len(synth.SHAPES))

    def forward(self, pixels):
        x = patch_embed(pixels, self.weight, stride=self.stride, pos_embed=self.positions,
                        cls_token=self.class_token, mean=CLIP_MEAN, std=CLIP_STD)
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        x = self.post_norm(x)
        return self.head(x[:, 0] if self.pooling == "class" else x[:, 1:].mean(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("towers", nargs="+", choices=sorted(TOWERS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    cache = f"/tmp/mmfast-shape-learning-{args.size}.pt"
    if not os.path.exists(cache):
        torch.save((pictures("train", 20000, args.size), pictures("held_out", 2000, args.size)), cache)
    (train_images, train_shapes), (held_images, held_shapes) = torch.load(cache)
    other_images, metas = other_renderer_set(648, args.size)
    other_shapes = torch.tensor([synth.SHAPES.index(meta["shape"]) for meta in metas])
    bands = np.array([meta["background"] for meta in metas])
    for name in args.towers:
        torch.manual_seed(0)
        model = (ClipTower if TOWERS[name][2] == "clip" else Tower)(args.size, *TOWERS[name])
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.98))
        warmup = 50
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warmup if step < warmup else
                                                     0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup))))
        generator, start = torch.Generator().manual_seed(0), time.time()
        for _ in range(args.steps):
            rows = torch.randint(0, len(train_images), (256,), generator=generator)
            loss = F.cross_entropy(model(train_images[rows]), train_shapes[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            held = (model(held_images).argmax(1) == held_shapes).float().mean().item()
            right = (model(other_images).argmax(1) == other_shapes).numpy()
        per_band = {band: round(float(right[bands == band].mean()), 3) for band in ("dark", "mid", "light")}
        print(f"{name}: {time.time() - start:.0f} s, held-out shape {held:.3f}, drawn another way "
              f"{right.mean():.3f} {per_band}", flush=True)


if __name__ == "__main__":
    main()
