"""Pseudo-captions from a trained LLaVA (`mmfast data caption`), as Recap-DataComp and BLIP's CapFilt
do: every image of the shards described by the captioner, written beside the sample's own caption as
`synthetic.txt`. Training then uses an uncaptioned image's synthetic caption, and where a sample has
both, the synthetic one with probability `data.synthetic_captions` (drawn per sample and step).
`--mix P` instead writes the choice into the shards (`.txt` the synthetic caption with probability P,
the original kept as `original.txt`) for trainers that read `.txt` alone.

Each output shard is written under a temporary name and renamed when complete, so a restart after a
kill redoes only the shard it was in.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import torch
from tqdm.auto import tqdm

from mmfast.data.pairs import SYNTHETIC_CAPTION, _open_image, image_member, tar_samples
from mmfast.data.splits import expand_shards
from mmfast.train.files import write_atomically

PROMPT = "Describe the image."  # the bundled conversations' description question


def describe(model, processor, images: list, prompt: str = PROMPT, max_new_tokens: int = 32) -> list[str]:
    """The captioner's greedy answer to `prompt` about each image (one batch, left-padded, run packed)."""
    device = next(model.parameters()).device
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt")
    inputs = {name: value.to(device) for name, value in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=processor.eos_token_id,
                             pad_token_id=processor.pad_token_id)
    return [answer.strip() for answer in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])]


def _uses_synthetic(identifier: str, mix: float, seed: int) -> bool:
    """A fixed draw per sample: the same shards give the same choices on every run."""
    digest = hashlib.sha256(f"{seed}/{identifier}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < mix


def caption_shards(run: str, data: str, out_dir: str, *, prompt: str = PROMPT, mix: float | None = None,
                   seed: int = 0, batch_size: int = 32, max_new_tokens: int = 32, device: str | None = None,
                   progress: bool = True) -> dict:
    """Writes each shard `data` matches into `out_dir` (same name): every sample's files unchanged plus
    `synthetic.txt`, its image described by the LLaVA run `run` (with `mix`: see the module); and
    `out_dir`/report.json. A sample whose image cannot be decoded is copied without a caption of its
    own making and counted."""
    from mmfast.train.load import load_llava
    import webdataset

    if mix is not None and not 0 <= mix <= 1:
        raise ValueError(f"mmfast data caption: --mix is a probability in [0, 1], got {mix}")
    shards = expand_shards(data)
    if not shards:
        raise ValueError(f"mmfast data caption: --data matches no shards, got {data!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_llava(run, device)
    os.makedirs(out_dir, exist_ok=True)
    totals = Counter()
    bar = tqdm(desc="mmfast data caption", unit="images", disable=not progress)
    for shard in shards:
        target = os.path.join(out_dir, os.path.basename(shard))
        counts_path = target + ".counts.json"
        if os.path.exists(target) and os.path.exists(counts_path):  # done before a kill
            totals.update(json.load(open(counts_path)))
            continue
        counts, pending = Counter(), []

        def flush(sink) -> None:
            images = [image for _, _, image in pending if image is not None]
            answers = iter(describe(model, processor, images, prompt, max_new_tokens) if images else [])
            for key, sample, image in pending:
                counts["samples"] += 1
                if image is None:
                    counts["undecodable image"] += 1
                    sink.write({"__key__": key, **sample})
                    continue
                caption = next(answers)
                counts["captioned"] += 1
                counts["had no caption"] += "txt" not in sample
                written = {**sample, SYNTHETIC_CAPTION: caption.encode()}
                if mix is not None and ("txt" not in sample or _uses_synthetic(f"{os.path.basename(shard)}/{key}",
                                                                              mix, seed)):
                    if "txt" in sample:
                        written["original.txt"] = sample["txt"]
                    written["txt"] = caption.encode()
                    counts["txt synthetic"] += 1
                sink.write({"__key__": key, **written})
            bar.update(len(images))
            pending.clear()

        partial = target + ".partial"
        with webdataset.TarWriter(partial) as sink:
            for key, sample in tar_samples(shard):
                image_key = image_member(sample)
                try:
                    image = _open_image(sample[image_key]) if image_key else None
                except Exception:  # any decoder failure means a corrupt image: copied, counted
                    image = None
                pending.append((key, sample, image))
                if sum(item[2] is not None for item in pending) == batch_size:
                    flush(sink)
            flush(sink)
        os.replace(partial, target)
        write_atomically(counts_path, json.dumps(counts))
        totals.update(counts)
    bar.close()
    if not totals["captioned"]:
        raise ValueError(f"mmfast data caption: no decodable image in the {totals['samples']} samples of "
                         f"{len(shards)} shard(s)")
    report = {"model": run, "data": data, "prompt": prompt, "mix": mix, "seed": seed, "shards": len(shards),
              **{name: totals[name] for name in ("samples", "captioned", "had no caption", "undecodable image",
                                                 "txt synthetic")}}
    write_atomically(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))
    return report
