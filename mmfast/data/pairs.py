"""Image-caption pairs from webdataset tar shards (img2dataset layout: image + .txt / .json) and from
CSV/TSV/JSONL files of (image path, caption) as open_clip reads them. A corrupt image or a missing
file is skipped and counted (`skipped`, with the reasons in `problems`), and iteration goes on."""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def _open_image(data: bytes | str) -> Image.Image:
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()  # decode now, so a truncated file fails here and not later
    return image.convert("RGB")


class ShardPairs(IterableDataset):
    """Yields (image, caption, meta) from tar shards in order; `transform(image)` if given.

    Every process (and DataLoader worker) reads every shard given unless `split_by_node` /
    `split_by_worker` (webdataset's splits): mmfast's trainer chooses the shards of each rank and
    worker itself."""

    def __init__(self, shards, transform=None, split_by_node: bool = False, split_by_worker: bool = False):
        self.shards = [shards] if isinstance(shards, str) else list(shards)
        missing = [path for path in self.shards if not os.path.exists(path)]
        if missing:
            raise FileNotFoundError(f"ShardPairs: shards not found: {missing[:5]}")
        self.transform = transform
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.problems: Counter = Counter()

    @property
    def skipped(self) -> int:
        return sum(self.problems.values())

    def __iter__(self):
        import webdataset

        every = lambda shards: shards  # noqa: E731
        for sample in webdataset.WebDataset(
                self.shards, shardshuffle=False, empty_check=False,
                nodesplitter=webdataset.split_by_node if self.split_by_node else every,
                workersplitter=webdataset.split_by_worker if self.split_by_worker else every):
            key = sample.get("__key__")
            image_key = next((extension for extension in IMAGE_EXTENSIONS if extension in sample), None)
            if image_key is None or "txt" not in sample:
                self.problems["missing image or caption"] += 1
                continue
            try:
                image = _open_image(sample[image_key])
            except Exception as error:  # any decoder failure means a corrupt sample
                self.problems[f"corrupt image ({type(error).__name__})"] += 1
                continue
            caption = sample["txt"].decode() if isinstance(sample["txt"], bytes) else sample["txt"]
            meta = json.loads(sample["json"]) if "json" in sample else {"key": key}
            yield (self.transform(image) if self.transform else image), caption, meta


class FilePairs(Dataset):
    """(image path, caption) rows of a CSV/TSV (open_clip's `--csv-img-key filepath --csv-caption-key
    title`) or JSONL file; paths are relative to the file's folder unless absolute. Missing or corrupt
    images are dropped when indexed through `valid()`."""

    def __init__(self, path: str, image_key: str = "filepath", caption_key: str = "title", separator: str | None = None,
                 transform=None):
        self.root = os.path.dirname(os.path.abspath(path))
        if path.endswith(".jsonl"):
            with open(path) as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
        else:
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter=separator or ("\t" if path.endswith(".tsv") else ",")))
        if rows and (image_key not in rows[0] or caption_key not in rows[0]):
            raise ValueError(f"FilePairs: {path} needs columns {image_key!r} and {caption_key!r}, has {sorted(rows[0])}")
        self.rows = [(row[image_key], row[caption_key]) for row in rows]
        self.transform = transform
        self.problems: Counter = Counter()

    @property
    def skipped(self) -> int:
        return sum(self.problems.values())

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int):
        """(image, caption) or None when the image is missing or corrupt (counted)."""
        relative, caption = self.rows[index]
        path = relative if os.path.isabs(relative) else os.path.join(self.root, relative)
        if not os.path.exists(path):
            self.problems["missing file"] += 1
            return None
        try:
            image = _open_image(path)
        except Exception as error:
            self.problems[f"corrupt image ({type(error).__name__})"] += 1
            return None
        return (self.transform(image) if self.transform else image), caption

    def __getitem__(self, index: int):
        return self.load(index)

    def valid(self):
        """Iterates the loadable pairs, skipping (and counting) the rest."""
        for index in range(len(self.rows)):
            pair = self.load(index)
            if pair is not None:
                yield pair
