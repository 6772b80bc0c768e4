"""The trainer's view of its data (the bundled synthetic shards, webdataset shards, or CSV/TSV/JSONL
files): whole splits in memory as uint8 images of one size, captions and metadata; and the data
order as a function of (seed, step), which makes resuming exact."""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import torch
from tqdm.auto import tqdm

from mmfast.data import FilePairs, ShardPairs, write_shards
from mmfast.data.preprocess import Preprocess


SYNTH_FORMAT = 3  # bumped when the generator changes, so older shards on disk are rewritten


def ensure_synth(data, progress: bool = True) -> None:
    """Writes the bundled shards into data.synth_dir unless the same ones are there (call on one rank)."""
    marker = os.path.join(data.synth_dir, "synth.json")
    wanted = {"format": SYNTH_FORMAT, "train": data.train_samples, "held_out": data.held_out_samples,
              "size": data.image_size,
              "seed": data.seed, "digit_fraction": data.digit_fraction, "geometry": data.synth_geometry}
    if os.path.exists(marker) and json.load(open(marker)) == wanted:
        return
    write_shards(data.synth_dir, train=data.train_samples, held_out=data.held_out_samples, size=data.image_size,
                 seed=data.seed, digit_fraction=data.digit_fraction, geometry=data.synth_geometry, progress=progress)
    with open(marker, "w") as handle:
        json.dump(wanted, handle)


def expand_shards(pattern: str) -> list[str]:
    """Shard paths from webdataset/open_clip syntax: braces (`{00000..00099}`, `{a,b}`), then glob
    patterns, joined with `::` for several sources; a named shard that is missing is an error."""
    from braceexpand import braceexpand

    paths = []
    for part in pattern.split("::"):
        for expanded in braceexpand(os.path.expanduser(part)):
            if glob.has_magic(expanded):
                paths.extend(sorted(glob.glob(expanded)))
            elif os.path.exists(expanded):
                paths.append(expanded)
            else:
                raise ValueError(f"config: shard {expanded!r} of {pattern!r} does not exist")
    return paths


def shard_paths(data, split: str) -> list[str]:
    """The .tar shards of a split: the bundled ones, or those data.train / data.held_out match."""
    if data.source == "synth":
        return sorted(os.path.join(data.synth_dir, name) for name in os.listdir(data.synth_dir)
                      if name.startswith(split + "-") and name.endswith(".tar"))
    pattern = data.train if split == "train" else data.held_out
    shards = expand_shards(pattern)
    if not shards:
        raise ValueError(f"config: data.{split} matches no shards, got {pattern!r}")
    return shards


def _reader(data, split: str):
    if data.source in ("synth", "shards"):
        return ShardPairs(shard_paths(data, split))
    pattern = data.train if split == "train" else data.held_out
    if data.source == "files":
        if not os.path.exists(pattern):
            raise ValueError(f"config: data.{split} must be a CSV/TSV/JSONL file, got {pattern!r}")
        return FilePairs(pattern, data.image_key, data.caption_key)
    raise ValueError(f"config: data.source must be 'synth', 'shards' or 'files', got {data.source!r}")


def _read_shard(job):
    """One shard's (uint8 images [n, 3, S, S] as numpy, captions, metas, problems), in a worker process."""
    path, image_size = job
    reader, preprocess = ShardPairs([path]), Preprocess(image_size)
    images, captions, metas = [], [], []
    for image, caption, meta in reader:
        images.append(preprocess(image).numpy())
        captions.append(caption)
        metas.append(meta)
    stacked = np.stack(images) if images else np.zeros((0, 3, image_size, image_size), np.uint8)
    return stacked, captions, metas, dict(reader.problems)


def _read_shards_in_parallel(reader: ShardPairs, image_size: int, label: str, quiet: bool):
    """What iterating `reader` and preprocessing gives, the shards read in one process per core (PNG
    decoding and tar parsing are most of a split's reading time), in order; problems merged into it."""
    import multiprocessing

    jobs = [(path, image_size) for path in reader.shards]
    images, captions, metas = [], [], []
    with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, len(jobs))) as pool:
        for shard_images, shard_captions, shard_metas, problems in tqdm(
                pool.imap(_read_shard, jobs), total=len(jobs), desc=f"reading {label}", unit="shard",
                disable=quiet, leave=False):
            images.append(torch.from_numpy(shard_images))
            captions += shard_captions
            metas += shard_metas
            reader.problems.update(problems)
    return images, captions, metas


def _read_pairs(reader, image_size: int, label: str, name: str, quiet: bool = False):
    """(uint8 images [N, 3, S, S], captions, metas) of everything `reader` reads, every image resized and
    centre-cropped to `image_size`; corrupt or missing images are skipped, counted and reported."""
    if isinstance(reader, ShardPairs) and len(reader.shards) > 1 and (os.cpu_count() or 1) > 1:
        images, captions, metas = _read_shards_in_parallel(reader, image_size, label, quiet)
        images = [batch for batch in images if len(batch)]
    else:
        preprocess = Preprocess(image_size)
        pairs = ((image, caption, {}) for image, caption in reader.valid()) if isinstance(reader, FilePairs) else reader
        images, captions, metas = [], [], []
        for image, caption, meta in tqdm(pairs, desc=f"reading {label}", disable=quiet, leave=False):
            images.append(preprocess(image)[None])
            captions.append(caption)
            metas.append(meta)
    if reader.skipped:
        print(f"mmfast train: skipped {reader.skipped} samples of {label}: {dict(reader.problems)}")
    if not captions:
        raise ValueError(f"mmfast train: {name} has no readable image-caption pairs")
    return torch.cat(images), captions, metas


def load_split(data, split: str):
    """(uint8 images [N, 3, S, S], captions, metas) of a split at data.image_size. The split is held
    in memory (S * S * 3 bytes per image)."""
    return _read_pairs(_reader(data, split), data.image_size, split, f"the {split} split", quiet=data.source == "synth")


SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _source_reader(data, name: str, pattern: str):
    if not SOURCE_NAME.match(name):
        raise ValueError(f"config: data.sources names must be letters, digits, '_' or '-' (they name metrics), "
                         f"got {name!r}")
    if pattern == "synth":
        return ShardPairs(shard_paths(data, "train"))
    if pattern.lower().endswith((".csv", ".tsv", ".jsonl")):
        if not os.path.exists(pattern):
            raise ValueError(f"config: data.sources.{name} must be an existing CSV/TSV/JSONL file, got {pattern!r}")
        return FilePairs(pattern, data.image_key, data.caption_key)
    shards = expand_shards(pattern)
    if not shards:
        raise ValueError(f"config: data.sources.{name} matches no shards, got {pattern!r}")
    return ShardPairs(shards)


def load_sources(data):
    """The training split of a mixture (data.sources: name -> shards, a CSV/TSV/JSONL file, or "synth"
    for the bundled train split): the sources' pairs one after another, as load_split gives them, and
    {name: number of pairs} in that order."""
    parts, sizes = [], {}
    for name, pattern in data.sources.items():
        label = f"data.sources.{name}"
        images, captions, metas = _read_pairs(_source_reader(data, name, pattern), data.image_size, label, label)
        parts.append((images, captions, metas))
        sizes[name] = len(captions)
    images = torch.cat([part[0] for part in parts])
    return (images, [c for part in parts for c in part[1]], [m for part in parts for m in part[2]]), sizes


OTHER_RENDERER_SAMPLES = 648  # 6 colors x 6 shapes x 3 background bands, 6 pictures each


def other_split(data):
    """The bundled vocabulary drawn another way (mmfast.data.other_renderer), at data.image_size, for
    the bundled data only: (uint8 images [648, 3, S, S], metas), or None."""
    if data.source != "synth":
        return None
    from mmfast.data.other_renderer import other_renderer_set

    return other_renderer_set(OTHER_RENDERER_SAMPLES, data.image_size, data.seed)


def batch_indices(step: int, size: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: one permutation per epoch, a function of (seed, step) only."""
    per_epoch = max(1, size // batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * batch:(position + 1) * batch]
