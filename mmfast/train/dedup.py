"""Removing duplicate images from shards (`mmfast data dedup`), as LAION, DataComp and SemDeDup do:
exact duplicates by a hash of the decoded pixels (the same picture re-encoded or with other metadata
is caught; a resized or recompressed one is not), near duplicates by the cosine of their image
embeddings under a trained CLIP, and training items too close to an evaluation split (exact or near),
so the evaluation does not score what was trained on.

The first of a group is kept (shard order, then sample order); every later item that is an exact
duplicate of an earlier one, or whose embedding has cosine >= --near with an earlier one, is removed.
Cosines come from faiss's exact inner-product range search where faiss is installed, a blocked matrix
product otherwise (the same answers; never the whole N x N matrix in memory). The embeddings and hashes
of each shard are kept under <out>/.index/ as they are made, so a killed run resumes with the shard it
was in; the kept shards are written as `mmfast data filter` writes them (each shard complete or absent).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from mmfast.data.pairs import TruncatedShard, _open_image, image_member, tar_samples
from mmfast.data.splits import expand_shards
from mmfast.train.curate import _sample_id, write_kept
from mmfast.train.files import write_atomically

BLOCK = 4096  # rows and columns of one block of the cosine product


def pixel_hash(image) -> str:
    """sha256 of an image's size and RGB pixels."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def _index_shard(shard: str, encoder, batch_size: int, problems: dict) -> dict:
    """{"ids", "hashes", "embeddings" (float32 [n, D], or None without an encoder)} of a shard's
    decodable images; the others counted in `problems`."""
    ids, hashes, embeddings, pending = [], [], [], []

    def flush():
        if pending:
            embeddings.append(encoder(pending))
            pending.clear()

    read = 0
    try:
        for key, sample in tar_samples(shard):
            image_key = image_member(sample)
            if image_key is None:
                problems["no image"] = problems.get("no image", 0) + 1
                continue
            try:
                image = _open_image(sample[image_key])
            except Exception as error:  # any decoder failure means a corrupt image
                name = f"corrupt image ({type(error).__name__})"
                problems[name] = problems.get(name, 0) + 1
                continue
            read += 1
            ids.append(_sample_id(shard, key))
            hashes.append(pixel_hash(image))
            if encoder is not None:
                pending.append(image)
                if len(pending) == batch_size:
                    flush()
    except TruncatedShard as error:
        name = f"truncated shard {error} after {read} samples"
        problems[name] = problems.get(name, 0) + 1
    if encoder is not None:
        flush()
    stacked = torch.cat(embeddings).cpu() if embeddings else None
    return {"ids": ids, "hashes": hashes, "embeddings": stacked}


def build_index(shards: list[str], folder: str, encoder, batch_size: int, desc: str, progress: bool):
    """(ids, hashes, embeddings or None, problems) of every shard, each shard's part read from `folder`
    when a previous run finished it."""
    os.makedirs(folder, exist_ok=True)
    ids, hashes, embeddings, problems = [], [], [], {}
    for shard in tqdm(shards, desc=desc, unit="shard", disable=not progress):
        path = os.path.join(folder, os.path.basename(shard) + ".pt")
        if os.path.exists(path):
            part = torch.load(path, weights_only=True)
        else:
            shard_problems: dict = {}
            part = _index_shard(shard, encoder, batch_size, shard_problems)
            part["problems"] = shard_problems
            torch.save(part, path + ".partial")
            os.replace(path + ".partial", path)
        ids += part["ids"]
        hashes += part["hashes"]
        if part["embeddings"] is not None:
            embeddings.append(part["embeddings"])
        for name, count in part["problems"].items():
            problems[name] = problems.get(name, 0) + count
    stacked = torch.cat(embeddings) if embeddings else None
    return ids, hashes, stacked, problems


def _on(device: str, embeddings):
    return None if embeddings is None else embeddings.to(device)


def _check_index_settings(folder: str, settings: dict) -> None:
    """An index left by a run with another model is refused, not mixed with this run's."""
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        before = json.load(open(path))
        if before != settings:
            raise ValueError(f"mmfast data dedup: {folder} holds the index of a run with {before}, this run has "
                             f"{settings}; give another --out or delete that folder")
    else:
        os.makedirs(folder, exist_ok=True)
        write_atomically(path, json.dumps(settings))


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def best_matches(queries: torch.Tensor, references: torch.Tensor, threshold: float, earlier_only: bool = False,
                 use_faiss: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query (unit rows), the reference with the highest cosine >= `threshold` (with
    `earlier_only`, queries and references are the same items and only references before the query
    count): (index, or -1 where none; that cosine, or -inf)."""
    faiss = _faiss() if use_faiss is not False else None
    if use_faiss and faiss is None:
        raise ImportError("mmfast data dedup: faiss was asked for and is not installed (pip install faiss-cpu)")
    count = len(queries)
    index = torch.full((count,), -1, dtype=torch.long)
    cosine = torch.full((count,), float("-inf"))
    if faiss is not None:
        store = faiss.IndexFlatIP(references.shape[1])
        store.add(references.float().cpu().numpy())
        for start in range(0, count, BLOCK):
            block = queries[start:start + BLOCK].float().cpu().numpy()
            limits, values, found = store.range_search(block, threshold - 1e-6)
            rows = torch.from_numpy(np.repeat(np.arange(len(block)), np.diff(limits).astype(np.int64)))
            values, found = torch.from_numpy(values).float(), torch.from_numpy(found).long()
            keep = values >= threshold
            if earlier_only:
                keep &= found < start + rows
            values = values.masked_fill(~keep, float("-inf"))
            best = torch.full((len(block),), float("-inf")).scatter_reduce(0, rows, values, "amax")
            winner = keep & (values == best[rows])
            index[start + rows[winner]], cosine[start + rows[winner]] = found[winner], values[winner]
        return index, cosine
    for start in range(0, count, BLOCK):
        block = queries[start:start + BLOCK].float()
        best_value = torch.full((len(block),), float("-inf"), device=block.device)
        best_index = torch.full((len(block),), -1, dtype=torch.long, device=block.device)
        end = start + len(block) if earlier_only else len(references)
        for column in range(0, end, BLOCK):
            values = block @ references[column:min(column + BLOCK, end)].float().T
            if earlier_only:  # reference j counts for query i only when j < i
                rows = torch.arange(start, start + len(block), device=values.device)[:, None]
                columns = torch.arange(column, column + values.shape[1], device=values.device)[None]
                values = values.masked_fill(columns >= rows, float("-inf"))
            value, where = values.max(1)
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, where + column, best_index)
        hit = best_value >= threshold
        index[start:start + len(block)] = torch.where(hit, best_index, -1).cpu()
        cosine[start:start + len(block)] = torch.where(hit, best_value, float("-inf")).cpu()
    return index, cosine


def _encoder(run: str, device: str):
    from mmfast.train.load import load_clip

    model, preprocess, _ = load_clip(run, device)

    def encode(images) -> torch.Tensor:
        with torch.no_grad():
            pixels = torch.stack([preprocess(image) for image in images]).to(device)
            return model.encode_image(pixels, normalize=True).float()  # stays on the device: the product runs there

    return encode


def dedup(data: str, out_dir: str, *, exact: bool = True, near: float | None = None, model: str | None = None,
          against: str | None = None, against_threshold: float | None = None, batch_size: int = 256,
          device: str | None = None, use_faiss: bool | None = None, progress: bool = True) -> dict:
    """Writes the shards `data` matches less their duplicates into `out_dir` (same names), with
    `out_dir`/removed.jsonl (each removed item's id, rule, and the id it repeats, with the cosine) and
    `out_dir`/report.json; returns the report. `against`: shards of an evaluation split whose exact
    copies (and, with a model, items of cosine >= `against_threshold`, default `near`) are removed."""
    if not exact and near is None and against is None:
        raise ValueError("mmfast data dedup: give --exact, --near THRESHOLD, --against SHARDS, or several")
    for name, value in (("--near", near), ("--against-threshold", against_threshold)):
        if value is not None and not -1 <= value <= 1:
            raise ValueError(f"mmfast data dedup: {name} is a cosine in [-1, 1], got {value}")
    against_threshold = near if against_threshold is None else against_threshold
    if (near is not None or against_threshold is not None) and not model:
        raise ValueError("mmfast data dedup: --near and --against-threshold compare image embeddings; give --model "
                         "(a CLIP run directory)")
    shards = expand_shards(data)
    if not shards:
        raise ValueError(f"mmfast data dedup: --data matches no shards, got {data!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = _encoder(model, device) if model and (near is not None or against_threshold is not None) else None
    folder = os.path.join(out_dir, ".index")
    _check_index_settings(folder, {"model": os.path.abspath(model) if encoder else None})
    ids, hashes, embeddings, problems = build_index(shards, folder, encoder, batch_size, "mmfast data dedup: index",
                                                    progress)
    embeddings = _on(device, embeddings)
    if not ids:
        raise ValueError(f"mmfast data dedup: no decodable image in the {len(shards)} shard(s) of --data "
                         f"(skipped: {problems})")
    removed: dict[str, list[dict]] = {}

    def remove(position: int, rule: str, of: str, cosine: float | None = None) -> None:
        record = {"id": ids[position], "rule": rule, "of": of}
        if cosine is not None:
            record["cosine"] = round(float(cosine), 6)
        removed.setdefault(ids[position], []).append(record)

    if against:
        evaluation = expand_shards(against)
        if not evaluation:
            raise ValueError(f"mmfast data dedup: --against matches no shards, got {against!r}")
        eval_ids, eval_hashes, eval_embeddings, _ = build_index(
            evaluation, os.path.join(folder, "against"), encoder, batch_size, "mmfast data dedup: evaluation", progress)
        eval_embeddings = _on(device, eval_embeddings)
        first_of = {}
        for position, digest in enumerate(eval_hashes):
            first_of.setdefault(digest, position)
        for position, digest in enumerate(hashes):
            if digest in first_of:
                remove(position, "copy of evaluation", eval_ids[first_of[digest]])
        if encoder is not None and eval_embeddings is not None and embeddings is not None:
            match, cosine = best_matches(embeddings, eval_embeddings, against_threshold, use_faiss=use_faiss)
            for position in (match >= 0).nonzero().flatten().tolist():
                if ids[position] not in removed:
                    remove(position, "close to evaluation", eval_ids[match[position]], cosine[position])
    exact_copies = set()
    if exact:
        first_of = {}
        for position, digest in enumerate(hashes):
            if digest in first_of:
                remove(position, "exact duplicate", ids[first_of[digest]])
                exact_copies.add(position)
            else:
                first_of[digest] = position
    if near is not None and embeddings is not None:
        match, cosine = best_matches(embeddings, embeddings, near, earlier_only=True, use_faiss=use_faiss)
        for position in (match >= 0).nonzero().flatten().tolist():
            if position not in exact_copies:
                remove(position, "near duplicate", ids[match[position]], cosine[position])

    known = set(ids)

    def failed_rules(shard: str, key: str, sample: dict) -> list[str]:
        identifier = _sample_id(shard, key)
        if identifier not in removed:
            return [] if identifier in known else ["no decodable image"]
        return [record["rule"] for record in removed[identifier]]

    totals, by_rule = write_kept(shards, out_dir, failed_rules, "mmfast data dedup: write", progress)
    write_atomically(os.path.join(out_dir, "removed.jsonl"),
                     "".join(json.dumps(record) + "\n" for records in removed.values() for record in records))
    report = {"data": data, "shards": len(shards), "model": model, "exact": exact, "near": near, "against": against,
              "against_threshold": against_threshold if against else None,
              "search": "faiss" if (_faiss() is not None and use_faiss is not False) else "blocked product",
              "pairs": totals["pairs"], "kept": totals["kept"], "removed_by_rule": dict(by_rule), "skipped": problems}
    write_atomically(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))
    return report
