"""Image-caption pairs from webdataset tar shards (img2dataset layout: image + .txt / .json) and from
CSV/TSV/JSONL files of (image path, caption) as open_clip reads them. A corrupt image or a missing
file is skipped and counted (`skipped`, with the reasons in `problems`), and iteration goes on."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections import Counter

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def _open_image(data: bytes | str) -> Image.Image:
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()  # decode now, so a truncated file fails here and not later
    return image.convert("RGB")


SYNTHETIC_CAPTION = "synthetic.txt"  # a pseudo-caption beside a sample's own (mmfast data caption)


def image_member(sample: dict) -> str | None:
    """The extension of a tar sample's image (the first of IMAGE_EXTENSIONS it has), or None."""
    return next((extension for extension in IMAGE_EXTENSIONS if extension in sample), None)


class TruncatedShard(Exception):
    """A tar shard that ends before its end-of-archive blocks (a partial download or copy)."""


def _is_complete_tar(path: str) -> bool:
    """A complete tar ends with two 512-byte zero blocks; a truncated one does not. (A compressed
    shard's cut shows when it is read: the decompressor raises.)"""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if handle.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
            return True
        if size < 1024 or size % 512:
            return False
        handle.seek(size - 1024)
        return not any(handle.read(1024))


def tar_samples(path: str):
    """(key, {extension: bytes}) of one tar shard in order, grouped as webdataset groups them (the
    key is the member's path up to the first dot of its name). Raises TruncatedShard after the
    samples read before the cut."""
    complete = _is_complete_tar(path)
    key, sample = None, {}
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                stem, _, extension = name.partition(".")
                member_key = os.path.join(folder, stem)
                if member_key != key and sample:
                    yield key, sample
                    sample = {}
                key = member_key
                sample[extension.lower()] = archive.extractfile(member).read()
    except (tarfile.ReadError, EOFError, OSError) as error:
        raise TruncatedShard(f"{os.path.basename(path)} ({error})") from None
    if not complete:
        raise TruncatedShard(f"{os.path.basename(path)} (no end-of-archive blocks)")
    if sample:
        yield key, sample


class ShardPairs(IterableDataset):
    """Yields (image, caption, meta) from tar shards in order; `transform(image)` if given.

    Every process (and DataLoader worker) reads every shard given unless `split_by_node` /
    `split_by_worker` (webdataset's splits): mmfast's trainer chooses the shards of each rank and
    worker itself. Bad samples are skipped and counted in `problems` by reason: a missing image or
    caption, an image that does not decode, a caption that is not UTF-8, a malformed .json; a
    truncated shard is reported with its name and how many samples were read from it."""

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

    def _my_shards(self) -> list[str]:
        import torch.distributed as dist
        from torch.utils.data import get_worker_info

        shards = self.shards
        if self.split_by_node and dist.is_available() and dist.is_initialized():
            shards = shards[dist.get_rank()::dist.get_world_size()]
        worker = get_worker_info()
        if self.split_by_worker and worker is not None:
            shards = shards[worker.id::worker.num_workers]
        return shards

    def __iter__(self):
        for path in self._my_shards():
            read = 0
            try:
                for key, sample in tar_samples(path):
                    pair = self.decode(key, sample)
                    if pair is not None:
                        read += 1
                        yield pair
            except TruncatedShard as error:
                self.problems[f"truncated shard {error} after {read} samples"] += 1

    def decode(self, key: str, sample: dict):
        """One tar sample's (image, caption, meta), or None with its problem counted. The caption is the
        `.txt`, or the `synthetic.txt` of an image without one; a sample with both has the synthetic
        one in meta["synthetic_caption"]."""
        image_key = image_member(sample)
        caption_key = "txt" if "txt" in sample else SYNTHETIC_CAPTION  # an uncaptioned image, pseudo-captioned
        if image_key is None or caption_key not in sample:
            self.problems["missing image or caption"] += 1
            return None
        try:
            caption = sample[caption_key].decode("utf-8")
            synthetic = sample[SYNTHETIC_CAPTION].decode("utf-8") if SYNTHETIC_CAPTION in sample else None
        except UnicodeDecodeError:
            self.problems["caption not UTF-8"] += 1
            return None
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {"key": key}
        except ValueError:
            self.problems["malformed .json"] += 1
            return None
        if synthetic is not None and caption_key == "txt":  # both: data.synthetic_captions chooses
            meta = {**meta, "synthetic_caption": synthetic}
        try:
            image = _open_image(sample[image_key])
        except Exception as error:  # any decoder failure means a corrupt sample
            self.problems[f"corrupt image ({type(error).__name__})"] += 1
            return None
        return (self.transform(image) if self.transform else image), caption, meta


class FilePairs(Dataset):
    """(image path, caption) rows of a CSV/TSV (open_clip's `--csv-img-key filepath --csv-caption-key
    title`) or JSONL file; paths are relative to the file's folder unless absolute. Missing or corrupt
    images are dropped when indexed through `valid()`."""

    def __init__(self, path: str, image_key: str = "filepath", caption_key: str = "title", separator: str | None = None,
                 transform=None):
        self.root = os.path.dirname(os.path.abspath(path))
        self.problems: Counter = Counter()
        # surrogateescape keeps a non-UTF-8 byte visible (as a lone surrogate) so its row is skipped
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            if path.endswith(".jsonl"):
                rows, malformed = [], []
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError:
                            malformed.append(number)
                if malformed:
                    name = os.path.basename(path)
                    self.problems[f"malformed JSONL line (first: {name} line {malformed[0]})"] = len(malformed)
            else:
                rows = list(csv.DictReader(handle, delimiter=separator or ("\t" if path.endswith(".tsv") else ",")))
        rows = [row for row in rows if isinstance(row, dict)]
        if rows and (image_key not in rows[0] or caption_key not in rows[0]):
            raise ValueError(f"FilePairs: {path} needs columns {image_key!r} and {caption_key!r}, has {sorted(rows[0])}")
        self.rows = []
        for row in rows:
            image, caption = row.get(image_key), row.get(caption_key)
            if not isinstance(image, str) or not isinstance(caption, str) or not image:
                self.problems["row without image path or caption"] += 1
            elif NOT_UTF8.search(image) or NOT_UTF8.search(caption):
                self.problems["not UTF-8"] += 1
            else:
                self.rows.append((image, caption))
        self.transform = transform

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
