"""The `mmfast` command: info, bench, train, eval, export, data synth."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys


# The modules a command imports beyond torch, and the extra of pyproject.toml that brings them.
EXTRAS = {
    "data": ("webdataset", "braceexpand", "sklearn", "PIL"),
    "train": ("webdataset", "braceexpand", "sklearn", "PIL", "tokenizers", "yaml"),
}


def _require(extra: str, command: str) -> None:
    import importlib.util

    missing = [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"mmfast {command}: needs {', '.join(missing)}, not installed: pip install 'mmfast[{extra}]'")


def _info(args) -> int:
    from mmfast.environment import describe, gpu_state

    facts = describe()
    if facts["devices"] != ["cpu"]:
        facts["gpu_state"] = gpu_state()
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    packages = facts.pop("optional_packages")
    for key, value in facts.items():
        print(f"{key:>16}: {', '.join(value) if isinstance(value, list) else value}")
    print(f"{'extras':>16}: " + ", ".join(f"{name} {version or '(not installed)'}" for name, version in packages.items()))
    return 0


def _bench(args) -> int:
    import torch

    from mmfast.bench import report
    from mmfast.bench.registry import MODES, suite_names
    from mmfast.bench.runner import run_suites

    names = suite_names() if args.suites in ([], ["all"]) else args.suites
    unknown = sorted(set(names) - set(suite_names()))
    if unknown:
        print(f"mmfast bench: unknown suite(s) {unknown}; available: {suite_names()} or 'all'", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profile = args.profile or ("cpu" if device.type == "cpu" else "quick" if args.quick else "full")
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    if set(modes) - set(MODES):
        print(f"mmfast bench: --modes takes {','.join(MODES)}, got {args.modes!r}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    directory = args.out or os.path.join("bench-results", f"{profile}-{stamp}")
    print(f"mmfast bench: suites {names}, profile {profile}, device {device}, modes {','.join(modes)}")
    rows = run_suites(names, profile, device, modes, trace=args.trace)
    paths = report.write(rows, directory)
    print(report.markdown(rows))
    print("wrote " + ", ".join(paths))
    return 0


def _synth(args) -> int:
    _require("data", "data synth")
    out = args.out or ("data/synth" if args.modality == "image" else f"data/synth-{args.modality}")
    if args.modality == "image":
        from mmfast.data.synth import write_shards

        written = write_shards(out, train=args.train, held_out=args.held_out, size=args.size, seed=args.seed,
                               shard_size=args.shard_size, digit_fraction=args.digit_fraction,
                               geometry=args.geometry)
    else:
        from mmfast.data.synth_media import write_media_shards

        written = write_media_shards(out, args.modality, train=args.train, held_out=args.held_out, seed=args.seed,
                                     shard_size=args.shard_size)
    for split, paths in written.items():
        print(f"{split}: {len(paths)} shard(s) in {out}")
    return 0


def _score(args) -> int:
    _require("data", "data score")
    from mmfast.train.curate import score

    report = score(args.model, args.data, args.out, batch_size=args.batch_size)
    print(f"scored {report['scored']} pairs ({sum(report['skipped'].values())} skipped) into {args.out}; "
          f"report {args.out}.report.json")
    return 0


def _filter(args) -> int:
    _require("data", "data filter")
    from mmfast.train.curate import filter_shards

    report = filter_shards(args.scores, args.data, args.out, threshold=args.threshold, top_fraction=args.top_fraction,
                           min_words=args.min_words, min_image_size=args.min_image_size, max_aspect=args.max_aspect)
    print(f"kept {report['kept']} of {report['pairs']} pairs (threshold {report['threshold']:.4f}); removed by rule "
          f"{report['removed_by_rule']}; shards and report.json in {args.out}")
    return 0


def _caption(args) -> int:
    _require("train", "data caption")
    from mmfast.train.pseudo_captions import caption_shards

    report = caption_shards(args.model, args.data, args.out, prompt=args.prompt, mix=args.mix, seed=args.seed,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(f"captioned {report['captioned']} of {report['samples']} samples ({report['had no caption']} had no "
          f"caption, {report['undecodable image']} undecodable); shards and report.json in {args.out}")
    return 0


def _dedup(args) -> int:
    _require("data", "data dedup")
    from mmfast.train.dedup import dedup

    report = dedup(args.data, args.out, exact=args.exact, near=args.near, model=args.model, against=args.against,
                   against_threshold=args.against_threshold, batch_size=args.batch_size)
    print(f"kept {report['kept']} of {report['pairs']} samples; removed by rule {report['removed_by_rule']}; "
          f"shards, removed.jsonl and report.json in {args.out}")
    return 0


def _train(args, overrides) -> int:
    _require("train", "train")
    from mmfast.train import load_config, train
    from mmfast.train.distributed import shutdown

    config = load_config(args.recipe, overrides)
    if args.run_dir:
        config.run_dir = args.run_dir
    result = train(config)
    distributed = shutdown()
    if result:  # rank 0
        print(json.dumps(result))
        print(f"run directory: {config.run_dir}")
    if distributed:
        # FSDP2's device meshes (in DTensor's internal caches) and DeepSpeed's communication module keep
        # the process group and its threads alive after destroy_process_group; tearing those down at
        # interpreter exit can abort a finished run. Everything is written and closed: leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _eval(args) -> int:
    _require("train", "eval")
    from mmfast.train import distributed
    from mmfast.train.config import load_config
    from mmfast.train.load import final_stage, load
    from mmfast.train.tasks import build_task

    run_dir = final_stage(args.run_dir)  # a multi-stage run: its last stage
    config = load_config(path=os.path.join(run_dir, "config.yaml"))
    config.run_dir = run_dir
    task = build_task(config, distributed.setup())
    task.prepare_evaluation(progress=True)
    loaded = load(run_dir)
    model = loaded[0] if isinstance(loaded, tuple) else loaded.model  # a unified run loads as its generator
    print(json.dumps(task.evaluate(model)))
    return 0


def _answer(model, processor, messages, image, max_new_tokens: int, temperature: float) -> str:
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image] if image is not None else None, text=[prompt])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature or 1.0, eos_token_id=processor.eos_token_id,
                         pad_token_id=processor.pad_token_id)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0]


def _open_image(path: str):
    from PIL import Image

    if not os.path.exists(path):
        raise SystemExit(f"mmfast: no image at {path}")
    with Image.open(path) as image:
        return image.convert("RGB")


def _generate(args) -> int:
    _require("train", "generate")
    import yaml

    from mmfast.train.load import final_stage, load_llava

    config = os.path.join(final_stage(args.run_dir), "config.yaml")
    if os.path.exists(config) and (yaml.safe_load(open(config)) or {}).get("task") == "unified":
        return _generate_unified(args)
    if args.prompt is None or args.audio or args.video or args.to:
        raise SystemExit("mmfast generate: a LLaVA run takes --prompt and optionally --image (--audio, --video and "
                         "--to are for unified runs)")
    model, processor = load_llava(args.run_dir)
    image = _open_image(args.image) if args.image else None
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": args.prompt}]
    print(_answer(model, processor, [{"role": "user", "content": content}], image, args.max_new_tokens,
                  args.temperature))
    return 0


def _read_audio(path: str):
    """(samples [channels, samples] or [samples] in [-1, 1], rate) of a WAV file (any rate, PCM or float)."""
    import numpy as np
    from scipy.io import wavfile

    if not os.path.exists(path):
        raise SystemExit(f"mmfast: no audio file at {path}")
    rate, samples = wavfile.read(path)
    if samples.dtype.kind in "iu":
        samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
    return (samples.T if samples.ndim == 2 else samples), rate


def _generate_unified(args) -> int:
    from mmfast.data.synth_media import wav_bytes
    from mmfast.train.load import load_unified

    model = load_unified(args.run_dir)
    options = {"steps": args.steps, "guidance": args.guidance}
    if args.to:
        if not args.prompt or not args.out:
            raise SystemExit("mmfast generate: --to needs --prompt (what to make) and --out (where to write it)")
        if args.to == "image":
            model.generate_image(args.prompt, **options).save(args.out)
        else:
            waveform, rate = model.generate_audio(args.prompt, **options)
            with open(args.out, "wb") as handle:
                handle.write(wav_bytes(waveform.numpy(), rate))
        print(f"wrote {args.out}")
        return 0
    given = [name for name in ("image", "audio", "video") if getattr(args, name)]
    if len(given) != 1:
        raise SystemExit("mmfast generate: a unified run describes exactly one of --image, --audio and --video "
                         "(or makes one with --to image|audio --prompt ... --out ...)")
    if args.image:
        item = {"image": _open_image(args.image)}
    elif args.audio:
        item = {"audio": _read_audio(args.audio)}
    else:
        import numpy as np

        if not os.path.exists(args.video):
            raise SystemExit(f"mmfast: no video file at {args.video}")
        item = {"video": np.load(args.video, allow_pickle=False)}
    print(model.generate_text(**item, prompt=args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def _chat(args) -> int:
    _require("train", "chat")
    from mmfast.train.load import load_llava

    model, processor = load_llava(args.run_dir)
    image = _open_image(args.image) if args.image else None
    messages: list[dict] = []
    print("mmfast chat: type a message, an empty line or Ctrl-D ends it")
    while True:
        try:
            line = input("you: ").strip()
        except EOFError:
            break
        if not line:
            break
        first = not messages and image is not None
        messages.append({"role": "user", "content": ([{"type": "image"}] if first else []) +
                         [{"type": "text", "text": line}]})
        reply = _answer(model, processor, messages, image, args.max_new_tokens, args.temperature)
        messages.append({"role": "assistant", "content": reply})
        print(f"model: {reply}")
    return 0


def _export(args) -> int:
    _require("train", "export")
    from mmfast.train.load import export_run

    print(f"wrote {export_run(args.run_dir, args.step)}")
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="mmfast", description="Fused multimodal training kernels and tools.")
    commands = main.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, devices, usable backends and optional extras")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)
    bench = commands.add_parser("bench", help="benchmark mmfast against the peers in one run")
    bench.add_argument("suites", nargs="*", help="suite names, or 'all' (default); 'mmfast bench compile --help' "
                       "compiles every Triton kernel for sm_80/sm_90 without a GPU")
    bench.add_argument("--quick", action="store_true",
                       help="short GPU sizes (under 2 minutes on an H100); the CPU always runs tiny sizes")
    bench.add_argument("--profile", choices=["full", "quick", "cpu"], help="override the sizes chosen from the device")
    bench.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    bench.add_argument("--modes", help="comma-separated: forward,backward,full (default: all)")
    bench.add_argument("--out", help="output folder (default: bench-results/<profile>-<time>)")
    bench.add_argument("--trace", metavar="DIR", help="also write a torch.profiler trace of each case and mode "
                       "there (Chrome/Perfetto JSON, read by TensorBoard's profiler plugin)")
    bench.set_defaults(run=_bench)
    train = commands.add_parser("train", help="train a model from a recipe (extra --section.key=value override it)")
    train.add_argument("--recipe", default="clip-tiny", help="a recipe name in mmfast/configs/ or a YAML path")
    train.add_argument("--run-dir", help="run directory (default: runs/<recipe>-<time>); an existing one resumes")
    train.set_defaults(run=_train, takes_overrides=True)
    evaluation = commands.add_parser("eval", help="zero-shot and retrieval scores of a run on its held-out split")
    evaluation.add_argument("run_dir", help="a run directory of mmfast train")
    evaluation.set_defaults(run=_eval)
    for name, help_text in (("generate", "a LLaVA run's answer to one prompt about an image; a unified run's "
                                         "caption of an image, sound or video, or an image or sound made from a prompt"),
                            ("chat", "a conversation with a LLaVA run about an image, in the terminal")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("run_dir", help="a LLaVA or unified run directory (a multi-stage run: its last stage)")
        command.add_argument("--image", help="an image file")
        if name == "generate":
            command.add_argument("--prompt", help="LLaVA: the question or instruction (required); unified: the start "
                                 "of the caption, or with --to what to make")
            command.add_argument("--audio", help="unified: a WAV file to describe (any rate: resampled)")
            command.add_argument("--video", help="unified: uint8 frames [T, H, W, 3] in a .npy file to describe")
            command.add_argument("--to", choices=["image", "audio"], help="unified: make an image or a sound of --prompt")
            command.add_argument("--out", help="unified, with --to: the PNG or WAV file to write")
            command.add_argument("--steps", type=int, help="unified, with --to: sampling steps (default: the run's)")
            command.add_argument("--guidance", type=float, help="unified, with --to: classifier-free guidance in [1, 20]")
        command.add_argument("--max-new-tokens", type=int, default=32)
        command.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: sampled")
        command.set_defaults(run=_generate if name == "generate" else _chat)
    export = commands.add_parser("export", help="consolidate a run's (sharded) checkpoint into <run_dir>/model.pt")
    export.add_argument("run_dir", help="a run directory of mmfast train")
    export.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    export.set_defaults(run=_export)
    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the bundled synthetic captioned image, audio or video shards (webdataset)")
    synth.add_argument("--modality", default="image", choices=["image", "audio", "video"],
                       help="shapes with captions (image), beeps (audio, 1 s at 16 kHz) or moving shapes (video, "
                            "8 frames)")
    synth.add_argument("--out", default=None, help="output folder (default: data/synth, data/synth-audio, ...)")
    synth.add_argument("--train", type=int, default=20000, help="training samples")
    synth.add_argument("--held-out", type=int, default=2000, help="held-out samples")
    synth.add_argument("--size", type=int, default=32, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-size", type=int, default=5000, help="samples per tar shard")
    synth.add_argument("--digit-fraction", type=float, default=0.1, help="share of handwritten digits")
    synth.add_argument("--geometry", default="anchored", choices=["anchored", "continuous"],
                       help="shapes at the named positions and sizes, or anywhere inside them, tilted and outlined")
    synth.set_defaults(run=_synth)
    scoring = data.add_parser("score", help="each image-caption pair's cosine under a trained CLIP (JSONL)")
    scoring.add_argument("--model", required=True, help="a CLIP run directory (or its model.pt)")
    scoring.add_argument("--data", required=True, help="shards: braces, globs, '::' between sources")
    scoring.add_argument("--out", required=True, help="the scores file (JSONL); a killed run resumes from it")
    scoring.add_argument("--batch-size", type=int, default=256)
    scoring.set_defaults(run=_score)
    keep = data.add_parser("filter", help="the pairs above a CLIP-score threshold (or top fraction) and basic "
                                          "rules, as new shards")
    keep.add_argument("--scores", required=True, help="a scores file of mmfast data score")
    keep.add_argument("--data", required=True, help="the shards that were scored")
    keep.add_argument("--out", required=True, help="folder for the kept shards and report.json")
    rule = keep.add_mutually_exclusive_group(required=True)
    rule.add_argument("--threshold", type=float, help="keep pairs scoring at least this")
    rule.add_argument("--top-fraction", type=float, help="keep this fraction of pairs, the best scored")
    keep.add_argument("--min-words", type=int, default=0, help="basic rule: captions of at least this many words")
    keep.add_argument("--min-image-size", type=int, default=0, help="basic rule: images' shorter side in pixels")
    keep.add_argument("--max-aspect", type=float, default=None, help="basic rule: longer side / shorter side")
    keep.set_defaults(run=_filter)
    captions = data.add_parser("caption", help="describe every image of the shards with a trained LLaVA "
                                                "(synthetic.txt beside each sample's own caption)")
    captions.add_argument("--model", required=True, help="a LLaVA run directory (a multi-stage run: its last stage)")
    captions.add_argument("--data", required=True, help="shards: braces, globs, '::' between sources")
    captions.add_argument("--out", required=True, help="folder for the captioned shards and report.json")
    captions.add_argument("--prompt", default="Describe the image.", help="the question asked about each image")
    captions.add_argument("--mix", type=float, default=None,
                          help="also write .txt as the synthetic caption with this probability (original.txt keeps "
                               "the original); without it .txt is unchanged and training chooses "
                               "(data.synthetic_captions)")
    captions.add_argument("--seed", type=int, default=0, help="the seed of --mix's draws")
    captions.add_argument("--batch-size", type=int, default=32)
    captions.add_argument("--max-new-tokens", type=int, default=32)
    captions.set_defaults(run=_caption)
    unique = data.add_parser("dedup", help="the shards less exact and near duplicate images, and less copies of an "
                                           "evaluation split")
    unique.add_argument("--data", required=True, help="shards: braces, globs, '::' between sources")
    unique.add_argument("--out", required=True, help="folder for the kept shards, removed.jsonl and report.json")
    unique.add_argument("--exact", action="store_true", help="remove later copies of the same pixels")
    unique.add_argument("--near", type=float, default=None,
                        help="remove images whose embedding cosine with an earlier one is at least this (needs --model)")
    unique.add_argument("--model", default=None, help="a CLIP run directory whose image tower embeds the images")
    unique.add_argument("--against", default=None, help="evaluation shards: remove their copies from --data")
    unique.add_argument("--against-threshold", type=float, default=None,
                        help="with --model: remove images this close to an evaluation image (default: --near)")
    unique.add_argument("--batch-size", type=int, default=256)
    unique.set_defaults(run=_dedup)
    return main


LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def _take_local_rank(argv: list[str]) -> list[str]:
    """Removes `--local_rank N` / `--local_rank=N` wherever a launcher put it (DeepSpeed's and
    torch.distributed.launch put it before the subcommand) and keeps it in LOCAL_RANK, which the
    engines read (the launchers set that variable too; theirs wins)."""
    rest, index = [], 0
    while index < len(argv):
        name, has_value, value = argv[index].partition("=")
        if name not in LOCAL_RANK_FLAGS:
            rest.append(argv[index])
        else:
            if not has_value:
                index += 1
                value = argv[index] if index < len(argv) else ""
            if not value.isdigit():
                raise SystemExit(f"mmfast: {name} takes a non-negative integer, got {value!r}")
            os.environ.setdefault("LOCAL_RANK", value)
        index += 1
    return rest


def main(argv=None) -> int:
    argv = _take_local_rank(sys.argv[1:] if argv is None else list(argv))
    if argv[:2] == ["bench", "compile"]:  # not a timed suite: its own flags (--targets, --jobs, --json)
        from mmfast.bench import compile as compile_check

        return compile_check.main(argv[2:])
    args, unknown = parser().parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        return args.run(args, unknown)
    if unknown:
        parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
