"""Curating image-caption shards with a trained CLIP (`mmfast data score`, `mmfast data filter`), as
DataComp filters: each pair's image-text cosine under the model, then the pairs kept by a score
threshold or top fraction, intersected with basic rules (caption words, image size, aspect ratio).

Both stream the shards (one sample in memory at a time, batches for the model), show progress, write
a JSON report beside their output, and resume after a kill: `score` keeps the complete lines it wrote
and scores the rest; `filter` writes each output shard under a temporary name and renames it when
complete, so a restart redoes only the shard it was in.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from mmfast.data.pairs import ShardPairs, TruncatedShard, image_member, tar_samples
from mmfast.data.splits import expand_shards
from mmfast.train.files import write_atomically


def _sample_id(shard: str, key: str) -> str:
    return f"{os.path.basename(shard)}/{key}"


def _completed_lines(path: str) -> list[str]:
    """The complete JSON lines of a scores file a killed run left (a cut last line is dropped)."""
    if not os.path.exists(path):
        return []
    lines = []
    with open(path) as handle:
        for line in handle:
            try:
                json.loads(line)
            except ValueError:
                break
            if line.endswith("\n"):
                lines.append(line)
    return lines


def score(run: str, data: str, out: str, *, batch_size: int = 256, device: str | None = None,
          progress: bool = True) -> dict:
    """Writes `out` (JSONL: one {"id", "score", "caption"} per readable pair of the shards `data`
    matches; "id" is "<shard file>/<sample key>") and `out` + ".report.json"; returns the report."""
    from mmfast.train.load import load_clip

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shards = expand_shards(data)
    if not shards:
        raise ValueError(f"mmfast data score: --data matches no shards, got {data!r}")
    model, preprocess, tokenizer = load_clip(run, device)
    lines = _completed_lines(out)
    write_atomically(out, "".join(lines))  # the complete lines of a previous, killed run
    done = {json.loads(line)["id"] for line in lines}
    reader, scores = ShardPairs(shards), [json.loads(line)["score"] for line in lines]
    pending: list = []

    def flush(handle) -> None:
        if not pending:
            return
        with torch.no_grad():
            images = model.encode_image(torch.stack([item[1] for item in pending]).to(device), normalize=True)
            texts = model.encode_text(tokenizer([item[2] for item in pending]).to(device), normalize=True)
            cosines = (images * texts).sum(-1).float().cpu().tolist()
        for (identifier, _, caption), cosine in zip(pending, cosines):
            handle.write(json.dumps({"id": identifier, "score": cosine, "caption": caption}) + "\n")
            scores.append(cosine)
        handle.flush()  # a kill loses at most this batch
        pending.clear()

    bar = tqdm(desc="mmfast data score", unit="pairs", disable=not progress)
    with open(out, "a") as handle:
        for shard in shards:
            read = 0
            try:
                for key, sample in tar_samples(shard):
                    identifier = _sample_id(shard, key)
                    if identifier in done:
                        continue
                    pair = reader.decode(key, sample)
                    if pair is None:
                        continue
                    read += 1
                    pending.append((identifier, preprocess(pair[0]), pair[1]))
                    if len(pending) == batch_size:
                        flush(handle)
                        bar.update(batch_size)
            except TruncatedShard as error:
                reader.problems[f"truncated shard {error} after {read} samples"] += 1
        count = len(pending)
        flush(handle)
        bar.update(count)
    bar.close()
    values = np.array(scores, dtype=np.float64)
    report = {"model": run, "shards": len(shards), "scored": len(scores), "skipped": dict(reader.problems),
              "mean": float(values.mean()) if len(values) else None,
              "quantiles": {str(q): float(np.quantile(values, q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9)}
              if len(values) else {}}
    write_atomically(out + ".report.json", json.dumps(report, indent=2))
    return report


def _read_scores(path: str) -> dict[str, float]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"mmfast data filter: no scores file at {path} (write it with mmfast data score)")
    return {row["id"]: row["score"] for row in map(json.loads, _completed_lines(path))}


def write_kept(shards: list[str], out_dir: str, failed_rules, command: str, progress: bool = True):
    """Writes each shard's samples for which `failed_rules(shard, key, sample)` names no rule as a shard of
    the same name in `out_dir` (all of a sample's files, unchanged); returns (totals, removed by rule).
    Each shard is written under a temporary name and renamed when complete, with its counts beside it,
    so a restart after a kill redoes only the shard it was in. Keeping nothing is an error that names
    what each rule removed, and leaves no shards behind."""
    import webdataset

    os.makedirs(out_dir, exist_ok=True)
    removed, totals = Counter(), Counter()
    for shard in tqdm(shards, desc=command, disable=not progress):
        target = os.path.join(out_dir, os.path.basename(shard))
        counts_path = target + ".counts.json"
        if os.path.exists(target) and os.path.exists(counts_path):  # done before a kill
            done = json.load(open(counts_path))
            totals.update(done["totals"])
            removed.update(done["removed"])
            continue
        shard_removed, shard_totals = Counter(), Counter()
        partial = target + ".partial"
        with webdataset.TarWriter(partial) as sink:
            for key, sample in tar_samples(shard):
                shard_totals["pairs"] += 1
                failed = failed_rules(shard, key, sample)
                shard_removed.update(failed)
                if failed:
                    continue
                shard_totals["kept"] += 1
                sink.write({"__key__": key, **sample})
        os.replace(partial, target)
        write_atomically(counts_path, json.dumps({"totals": shard_totals, "removed": shard_removed}))
        totals.update(shard_totals)
        removed.update(shard_removed)
    if not totals["kept"]:
        for shard in shards:
            for path in (os.path.join(out_dir, os.path.basename(shard)),
                         os.path.join(out_dir, os.path.basename(shard)) + ".counts.json"):
                if os.path.exists(path):
                    os.remove(path)
        raise ValueError(f"{command}: no pair of the {totals['pairs']} in {len(shards)} shard(s) is kept (removed by "
                         f"rule: {dict(removed)}); nothing was written to {out_dir}")
    return totals, removed


def filter_shards(scores_path: str, data: str, out_dir: str, *, threshold: float | None = None,
                  top_fraction: float | None = None, min_words: int = 0, min_image_size: int = 0,
                  max_aspect: float | None = None, progress: bool = True) -> dict:
    """Writes the kept pairs of each shard `data` matches as a shard of the same name in `out_dir` (all
    of a sample's files, unchanged) and `out_dir`/report.json: how many pairs each rule removed (a
    pair may fail several) and how many were kept. A pair is kept when its score is at least the
    threshold (or among the top fraction of all scores) and it passes the basic rules; a pair with no
    score (unreadable when scored) is removed."""
    from PIL import Image

    if (threshold is None) == (top_fraction is None):
        raise ValueError("mmfast data filter: give exactly one of --threshold and --top-fraction")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ValueError(f"mmfast data filter: --top-fraction must be in (0, 1], got {top_fraction}")
    scores = _read_scores(scores_path)
    if top_fraction is not None:
        values = np.sort(np.array(list(scores.values())))[::-1]
        threshold = float(values[max(0, int(round(top_fraction * len(values))) - 1)]) if len(values) else 0.0
    shards = expand_shards(data)
    if not shards:
        raise ValueError(f"mmfast data filter: --data matches no shards, got {data!r}")
    scored = {identifier.split("/", 1)[0] for identifier in scores}
    if not scored & {os.path.basename(shard) for shard in shards}:
        raise ValueError(f"mmfast data filter: the scores file {scores_path} ({len(scores)} pairs) scored shards "
                         f"{sorted(scored)[:3]}..., none of the {len(shards)} that --data matches "
                         f"({os.path.basename(shards[0])}, ...): score these shards first")

    def failed_rules(shard: str, key: str, sample: dict) -> list[str]:
        failed = []
        value = scores.get(_sample_id(shard, key))
        if value is None:
            failed.append("no score")
        elif value < threshold:
            failed.append("clip score")
        caption = sample.get("txt", b"").decode("utf-8", errors="replace")
        if len(caption.split()) < min_words:
            failed.append("caption words")
        if min_image_size or max_aspect:
            image_key = image_member(sample)
            if image_key is None:
                failed.append("no image")
            else:
                width, height = Image.open(io.BytesIO(sample[image_key])).size  # the header only
                if min(width, height) < min_image_size:
                    failed.append("image size")
                if max_aspect and max(width, height) / max(min(width, height), 1) > max_aspect:
                    failed.append("aspect ratio")
        return failed

    totals, removed = write_kept(shards, out_dir, failed_rules, "mmfast data filter", progress)
    report = {"scores": scores_path, "threshold": threshold, "top_fraction": top_fraction,
              "rules": {"min_words": min_words, "min_image_size": min_image_size, "max_aspect": max_aspect},
              "pairs": totals["pairs"], "kept": totals["kept"], "removed_by_rule": dict(removed)}
    write_atomically(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))
    return report
