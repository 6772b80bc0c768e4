"""Issue 18's evidence: does filtering noisy pairs with a CLIP trained on a small clean seed set, and
pseudo-captioning the uncaptioned images with a LLaVA captioner, give a better CLIP than the noisy data?

    python benchmarks/noisy_captions.py --out runs/noisy-captions        # about 20 minutes on 2 CPU cores

1. The bundled pictures (`continuous`, no digits): a training set, and a held-out split that every CLIP
   below is scored on (zero-shot over the 36 color x shape classes).
2. A noisy copy of the training set: 20 % of the images lose their caption, 40 % of the others get the
   caption of another picture; each sample's JSON says which (`noise`: clean, swapped or uncaptioned).
3. A seed CLIP on a small clean set (other pictures).
4. `mmfast data score` of the noisy pairs with the seed CLIP; the threshold is the 10th percentile
   (--clean-quantile) of the seed CLIP's scores on its own clean held-out pairs (no label of the noisy
   set is used to choose it); `mmfast data filter` keeps the pairs above it. Precision and recall of
   the removed pairs against the swapped ones are reported.
5. The main job's CLIP (fewer steps) trained on (a) the noisy pairs and (b) the filtered ones.
6. A LLaVA captioner bootstrapped from (b), as BLIP's CapFilt: (b)'s vision tower frozen, projector and
   language model taught to answer "Describe the image." with the seed pairs' captions (vicuna template);
   `mmfast data caption` of the uncaptioned images, and the pseudo-captions through a filter: by default
   (b)'s CLIP keeping its top 30 % (--caption-keep, --caption-top-fraction: DataComp's CLIP-score
   filter), as CapFilt's "Filt".
7. (c): the CLIP trained on the filtered pairs plus the kept pseudo-captioned images (`data.sources`).
   With --seeds K, (b) and (c) are trained again with training seeds 1 .. K-1 (the same data) and the
   table gives their means.

Writes `<out>/results.json` and `<out>/noisy_captions.png`; prints the table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np

from mmfast.data.pairs import tar_samples
from mmfast.data.synth import write_shards

SEED_CLIP = ["--data.train_samples={seed}", "--data.held_out_samples=500", "--train.steps={seed_steps}",
             "--train.eval_every={seed_steps}", "--train.checkpoint_every={seed_steps}", "--optim.warmup_steps=20"]


def noisy_copy(shards: list[str], out_dir: str, swapped: float = 0.4, uncaptioned: float = 0.2, seed: int = 0) -> dict:
    """Writes each shard's samples into `out_dir` with `uncaptioned` of the images stripped of their
    caption and `swapped` of the other captions replaced by another sample's; returns the counts."""
    import webdataset

    rng = np.random.default_rng(seed)
    samples = [(os.path.basename(shard), key, sample) for shard in shards for key, sample in tar_samples(shard)]
    captions = [sample["txt"] for _, _, sample in samples]
    counts = {"clean": 0, "swapped": 0, "uncaptioned": 0}
    os.makedirs(out_dir, exist_ok=True)
    sinks = {}
    for index, (name, key, sample) in enumerate(samples):
        meta = json.loads(sample["json"])
        written = {"png": sample["png"]}
        if rng.random() < uncaptioned:
            meta["noise"] = "uncaptioned"
        elif rng.random() < swapped:
            other = int(rng.integers(len(samples) - 1))
            other += other >= index  # another picture's caption
            written["txt"], meta["noise"], meta["true_caption"] = captions[other], "swapped", sample["txt"].decode()
        else:
            written["txt"], meta["noise"] = sample["txt"], "clean"
        counts[meta["noise"]] += 1
        written["json"] = json.dumps(meta).encode()
        if name not in sinks:
            sinks[name] = webdataset.TarWriter(os.path.join(out_dir, name))
        sinks[name].write({"__key__": key, **written})
    for sink in sinks.values():
        sink.close()
    return counts


def caption_conversations(shards: list[str], out_dir: str, name: str, limit: int | None = None) -> str:
    """LLaVA's JSON of "Describe the image." -> each pair's caption, with the pictures as PNG files in
    `out_dir` (for the captioner); returns the JSON's path."""
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for shard in shards:
        for key, sample in tar_samples(shard):
            if limit is not None and len(entries) >= limit:
                break
            image = f"{os.path.basename(key)}.png"
            with open(os.path.join(out_dir, image), "wb") as handle:
                handle.write(sample["png"])
            entries.append({"id": key, "image": image, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": sample["txt"].decode()}]})
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(entries, handle)
    return path


def split_uncaptioned(noisy_dir: str, out_dir: str) -> int:
    """The noisy set's uncaptioned images as shards of their own (for `mmfast data caption`)."""
    import webdataset

    os.makedirs(out_dir, exist_ok=True)
    count = 0
    for shard in sorted(glob.glob(os.path.join(noisy_dir, "*.tar"))):
        with webdataset.TarWriter(os.path.join(out_dir, os.path.basename(shard))) as sink:
            for key, sample in tar_samples(shard):
                if "txt" not in sample:
                    sink.write({"__key__": key, **sample})
                    count += 1
    return count


def filter_quality(scores_path: str, noisy_dir: str, threshold: float) -> dict:
    """Precision and recall of the pairs the threshold removes, against the swapped captions."""
    scores = {row["id"]: row["score"] for row in map(json.loads, open(scores_path))}
    removed_swapped = removed = swapped = 0
    for shard in sorted(glob.glob(os.path.join(noisy_dir, "*.tar"))):
        for key, sample in tar_samples(shard):
            identifier = f"{os.path.basename(shard)}/{key}"
            if identifier not in scores:
                continue
            is_swapped = json.loads(sample["json"])["noise"] == "swapped"
            is_removed = scores[identifier] < threshold
            swapped += is_swapped
            removed += is_removed
            removed_swapped += is_swapped and is_removed
    return {"threshold": threshold, "removed": removed, "swapped": swapped,
            "precision": removed_swapped / max(removed, 1), "recall": removed_swapped / max(swapped, 1)}


def pseudo_caption_accuracy(captioned_dir: str, scores_path: str, threshold: float) -> dict:
    """How often the pseudo-captions name the picture's color and shape (all, and those the filter keeps)."""
    scores = {row["id"]: row["score"] for row in map(json.loads, open(scores_path))}
    rows = []
    for shard in sorted(glob.glob(os.path.join(captioned_dir, "*.tar"))):
        for key, sample in tar_samples(shard):
            if "synthetic.txt" not in sample:
                continue
            meta = json.loads(sample["json"])
            words = sample["synthetic.txt"].decode().replace(".", " ").replace(",", " ").split()
            shape_words = {meta["shape"], meta["shape"] + "s", meta["shape"] + "es"}
            kept = scores.get(f"{os.path.basename(shard)}/{key}", -2) >= threshold
            rows.append((meta["color"] in words, bool(shape_words & set(words)), kept))
    table = np.array(rows, dtype=bool).reshape(-1, 3)
    kept = table[table[:, 2]]
    return {"color": float(table[:, 0].mean()), "shape": float(table[:, 1].mean()),
            "kept_color": float(kept[:, 0].mean()) if len(kept) else 0.0,
            "kept_shape": float(kept[:, 1].mean()) if len(kept) else 0.0}


def _clip(out: str, name: str, overrides: list[str], progress: bool) -> dict:
    from mmfast.train import load_config, train

    config = load_config("clip-tiny", overrides)
    config.run_dir = os.path.join(out, name)
    started = time.perf_counter()
    result = train(config, progress=progress)
    return {**result, "seconds": time.perf_counter() - started}


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["runs"])
    seeds = results.get("seeds", {})
    runs = [seeds.get(name, [results["runs"][name]["zero_shot_accuracy"]]) for name in names]
    labels = [name.replace(" + ", "\n+ ") for name in names]
    figure, axis = plt.subplots(figsize=(6, 3.2))
    bars = axis.bar(labels, [np.mean(values) for values in runs], color=["#c44", "#48c", "#4a4"][:len(names)])
    axis.bar_label(bars, fmt="%.3f")
    for label, values in zip(labels, runs):
        if len(values) > 1:
            axis.plot([label] * len(values), values, "k.", markersize=4)
    several = max(len(values) for values in runs) > 1
    axis.set_ylabel("held-out zero-shot (36 classes)" + ("\nmean of training seeds (dots)" if several else ""))
    axis.set_ylim(0, 1)
    quality = results["filter"]
    axis.set_title(f"filter: precision {quality['precision']:.2f}, recall {quality['recall']:.2f} of swapped captions",
                   fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/noisy-captions")
    parser.add_argument("--train", type=int, default=20000, help="pictures in the training set")
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--seed-pairs", type=int, default=2000, help="the clean seed set of the filter's CLIP")
    parser.add_argument("--seed-steps", type=int, default=150)
    parser.add_argument("--captioner-steps", type=int, default=600)
    parser.add_argument("--captioner-data", choices=("seed", "filtered"), default="seed",
                        help="the captioner's pairs: the clean seed set, or (b)'s filtered pairs")
    parser.add_argument("--caption-filter", choices=("seed", "filtered"), default="filtered",
                        help="the CLIP that filters the pseudo-captions: (b)'s, or the seed CLIP (as the web captions)")
    parser.add_argument("--caption-keep", choices=("top", "threshold"), default="top",
                        help="keep the pseudo-captions the filter scores in its top --caption-top-fraction (DataComp's "
                             "CLIP-score filter), or those above the --clean-quantile of its clean held-out scores")
    parser.add_argument("--caption-top-fraction", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, default=1,
                        help="train (b) and (c) with this many training seeds (0, 1, ...); the table gives their mean")
    parser.add_argument("--steps", type=int, default=400, help="steps of each compared CLIP")
    parser.add_argument("--clean-quantile", type=float, default=0.1,
                        help="the threshold: this quantile of the seed CLIP's scores on its clean held-out pairs")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="toy models and sizes (the test's)")
    arguments = parser.parse_args(argv)
    if arguments.seeds < 1 or not 0 < arguments.caption_top_fraction <= 1:
        parser.error(f"expected --seeds >= 1 and --caption-top-fraction in (0, 1], got {arguments.seeds} and "
                     f"{arguments.caption_top_fraction}")
    out, progress = os.path.abspath(arguments.out), not arguments.tiny
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    def lap(name):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        print(f"[{time.perf_counter() - started:6.0f} s] {name} done", flush=True)

    tiny_clip = (["--model.vision.width=32", "--model.vision.layers=1", "--model.vision.heads=2",
                  "--model.text.width=32", "--model.text.layers=1", "--model.text.heads=2", "--model.embed_dim=16",
                  "--model.text.vocab_size=200"] if arguments.tiny else [])
    data = os.path.join(out, "synth")
    write_shards(data, train=arguments.train, held_out=arguments.held_out, size=32, seed=0, digit_fraction=0.0,
                 geometry="continuous", progress=progress)
    counts = noisy_copy(sorted(glob.glob(os.path.join(data, "train-*.tar"))), os.path.join(out, "noisy"))
    uncaptioned = split_uncaptioned(os.path.join(out, "noisy"), os.path.join(out, "uncaptioned"))
    lap("data")

    seed_overrides = [value.format(seed=arguments.seed_pairs, seed_steps=arguments.seed_steps) for value in SEED_CLIP]
    seed = _clip(out, "seed-clip", [*seed_overrides, f"--data.synth_dir={out}/seed-synth", "--data.seed=1",
                                    f"--data.batch_size={arguments.batch}", *tiny_clip], progress)
    lap("seed CLIP")

    from mmfast.train import load_config, train
    from mmfast.train.curate import filter_shards, score
    from mmfast.train.pseudo_captions import caption_shards

    # the threshold: a low quantile of the seed CLIP's scores on its own clean held-out pairs
    score(os.path.join(out, "seed-clip"), os.path.join(out, "seed-synth", "held_out-*.tar"),
          os.path.join(out, "seed-scores.jsonl"), progress=progress)
    clean = [row["score"] for row in map(json.loads, open(os.path.join(out, "seed-scores.jsonl")))]
    threshold = float(np.quantile(clean, arguments.clean_quantile))
    score(os.path.join(out, "seed-clip"), os.path.join(out, "noisy", "*.tar"), os.path.join(out, "scores.jsonl"),
          progress=progress)
    filtered = filter_shards(os.path.join(out, "scores.jsonl"), os.path.join(out, "noisy", "*.tar"),
                             os.path.join(out, "filtered"), threshold=threshold, progress=progress)
    quality = filter_quality(os.path.join(out, "scores.jsonl"), os.path.join(out, "noisy"), threshold)
    lap("score and filter")

    held_out = os.path.join(data, "held_out-*.tar")
    common = ["--data.source=shards", f"--data.held_out={held_out}", f"--data.batch_size={arguments.batch}",
              f"--train.steps={arguments.steps}", f"--train.eval_every={arguments.steps}",
              f"--train.checkpoint_every={arguments.steps}", *tiny_clip]
    runs = {"(a) noisy": _clip(out, "a-noisy", [*common, f"--data.train={out}/noisy/*.tar"], progress),
            "(b) filtered": _clip(out, "b-filtered", [*common, f"--data.train={out}/filtered/*.tar"], progress)}
    lap("CLIPs (a) and (b)")

    # the captioner bootstraps from (b), as BLIP's CapFilt from its pretrained model: (b)'s vision tower
    # (frozen), a projector and language model taught to describe the clean seed pictures with their captions
    seed_folder = os.path.join(out, "seed-conversations")
    taught = "seed-synth/train-*.tar" if arguments.captioner_data == "seed" else "filtered/*.tar"
    train_json = caption_conversations(sorted(glob.glob(os.path.join(out, taught))), seed_folder, "train")
    held_json = caption_conversations(sorted(glob.glob(os.path.join(out, "seed-synth", "held_out-*.tar"))), seed_folder,
                                      "held_out", limit=100)
    captioner = load_config("llava-tiny", ["--data.source=files", f"--data.conversations={train_json}",
                                           f"--data.held_out_conversations={held_json}",
                                           f"--data.image_folder={seed_folder}",
                                           "--data.template=vicuna_v1", f"--train.steps={arguments.captioner_steps}",
                                           f"--train.eval_every={arguments.captioner_steps}",
                                           f"--train.checkpoint_every={arguments.captioner_steps}",
                                           f"--train.init_from={out}/b-filtered",
                                           "--train.trainable=[model.multi_modal_projector,model.language_model,lm_head]",
                                           *(["--model.text.hidden_size=32", "--model.text.intermediate_size=64",
                                              "--model.text.num_hidden_layers=1", "--model.vision.width=32",
                                              "--model.vision.layers=1", "--model.vision.heads=2"]
                                             if arguments.tiny else [])])
    captioner.stages, captioner.run_dir = [], os.path.join(out, "captioner")
    captioner_result = train(captioner, progress=progress)
    lap("LLaVA captioner")
    captioned = caption_shards(os.path.join(out, "captioner"), os.path.join(out, "uncaptioned", "*.tar"),
                               os.path.join(out, "captioned"), batch_size=64, max_new_tokens=16, progress=progress)
    # and the pseudo-captions pass a filter (CapFilt's "Filt"): the web captions' (the seed CLIP at its
    # threshold), or (b)'s CLIP, which knows the shapes better, at the same quantile of its clean scores
    # (by default (b)'s CLIP keeping its top 30 %: the captioner sees through (b)'s tower, so a threshold
    # that passes most clean pairs passes most of its mistakes too)
    caption_threshold, filter_clip = threshold, os.path.join(out, "seed-clip")
    if arguments.caption_filter == "filtered":
        filter_clip = os.path.join(out, "b-filtered")
        score(filter_clip, os.path.join(out, "seed-synth", "held_out-*.tar"),
              os.path.join(out, "b-clean-scores.jsonl"), progress=progress)
        clean_b = [row["score"] for row in map(json.loads, open(os.path.join(out, "b-clean-scores.jsonl")))]
        caption_threshold = float(np.quantile(clean_b, arguments.clean_quantile))
    score(filter_clip, os.path.join(out, "captioned", "*.tar"), os.path.join(out, "captioned-scores.jsonl"),
          progress=progress)
    keep = ({"top_fraction": arguments.caption_top_fraction} if arguments.caption_keep == "top"
            else {"threshold": caption_threshold})
    try:
        captioned_kept = filter_shards(os.path.join(out, "captioned-scores.jsonl"),
                                       os.path.join(out, "captioned", "*.tar"), os.path.join(out, "captioned-kept"),
                                       progress=progress, **keep)
        caption_threshold = captioned_kept["threshold"]  # the top fraction's lowest kept score
    except ValueError as error:  # none passes: (c) is (b)'s data again, and the table says so
        print(error)
        captioned_kept = {"kept": 0}
    captioned["kept"], captioned["correct"] = captioned_kept["kept"], pseudo_caption_accuracy(
        os.path.join(out, "captioned"), os.path.join(out, "captioned-scores.jsonl"), caption_threshold)
    captioned["filter_threshold"] = caption_threshold
    lap("pseudo-captions")
    sources = f"{{filtered: '{out}/filtered/*.tar'" + (f", captioned: '{out}/captioned-kept/*.tar'}}"
                                                       if captioned["kept"] else "}")
    runs["(c) filtered + pseudo-captions"] = _clip(out, "c-captioned", [*common, f"--data.sources={sources}"], progress)
    lap("CLIP (c)")
    # (b) and (c) again with other training seeds (the same data): how far a single run's difference goes
    seeds = {name: [runs[name]["zero_shot_accuracy"]] for name in ("(b) filtered", "(c) filtered + pseudo-captions")}
    for seed_index in range(1, arguments.seeds):
        for name, folder, data in (("(b) filtered", "b-filtered", f"--data.train={out}/filtered/*.tar"),
                                   ("(c) filtered + pseudo-captions", "c-captioned", f"--data.sources={sources}")):
            rerun = _clip(out, f"{folder}-seed{seed_index}", [*common, data, f"--train.seed={seed_index}"], progress)
            seeds[name].append(rerun["zero_shot_accuracy"])
    if arguments.seeds > 1:
        lap(f"(b) and (c), seeds 1-{arguments.seeds - 1}")
    results = {"noise": counts, "uncaptioned_shards": uncaptioned, "seed_clip": seed, "captioner": captioner_result,
               "filter": {**quality, "kept": filtered["kept"], "samples": filtered["pairs"],
                          "removed_by_rule": filtered["removed_by_rule"]},
               "pseudo_captions": captioned, "runs": runs, "seeds": seeds, "seconds": timings,
               "total_seconds": round(time.perf_counter() - started, 1), "arguments": vars(arguments)}
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    _plot(results, os.path.join(out, "noisy_captions.png"))
    print(f"noise {counts}; filter at {threshold:.4f}: kept {filtered['kept']} of {counts['clean'] + counts['swapped']} pairs, "
          f"precision {quality['precision']:.3f}, recall {quality['recall']:.3f} of the swapped captions")
    correct = captioned["correct"]
    print(f"pseudo-captions: {captioned['captioned']} written, {captioned['kept']} kept by the filter; color right in "
          f"{correct['color']:.3f} and shape in {correct['shape']:.3f} of all, {correct['kept_color']:.3f} / "
          f"{correct['kept_shape']:.3f} of the kept")
    print("| training data | pairs | held-out zero-shot | image->text R@1 | seconds |\n| --- | --- | --- | --- | --- |")
    sizes = {"(a) noisy": counts["clean"] + counts["swapped"], "(b) filtered": filtered["kept"],
             "(c) filtered + pseudo-captions": filtered["kept"] + captioned["kept"]}
    for name, result in runs.items():
        print(f"| {name} | {sizes[name]} | {result['zero_shot_accuracy']:.3f} | {result['image_to_text_R@1']:.3f} | "
              f"{result['seconds']:.0f} |")
    if arguments.seeds > 1:
        for name, values in seeds.items():
            print(f"{name}, training seeds 0-{arguments.seeds - 1}: {', '.join(f'{v:.4f}' for v in values)}; mean "
                  f"{np.mean(values):.4f}")
    print(f"total {results['total_seconds']:.0f} s: {timings}")
    return results


if __name__ == "__main__":
    main()
