"""The issues' performance targets, checked against `mmfast bench` results (results.json files):

    python -m mmfast.bench.targets RESULTS_DIR [...]     # prints a Markdown table: target, measured, met

A target is a speedup (a baseline's median time over mmfast's, same run, same group and mode), an
absolute TFLOP/s of mmfast's row, or a bound on mmfast's peak memory. A target whose rows are
missing (a suite that did not run, a peer that is not installed) says "not measured".
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    suite: str
    group: str
    mode: str
    baseline: str | None = None  # speedup over this provider
    speedup: float | None = None
    tflops: float | None = None  # mmfast's TFLOP/s at least
    memory_mb: float | None = None  # mmfast's peak memory at most (-1: the baseline's)
    memory_ratio: float | None = None  # mmfast's peak memory at most this times the baseline's


TARGETS = (
    Target("log-mel B=64 x 30 s, 80 mels vs torchaudio", "log_mel", "B=64 x 30 s, 80 mels", "forward",
           "torchaudio", speedup=3.0),
    Target("mixed attention (BASELINES) fwd+bwd vs Flex, mask built every step", "mixed_attention",
           "mixed S=8192 (BASELINES)", "full", "flex, mask built every step", speedup=1.3),
    Target("mixed attention (BASELINES) fwd+bwd vs Flex, mask built once", "mixed_attention",
           "mixed S=8192 (BASELINES)", "full", "flex, mask built once", speedup=1.0),
    Target("plain causal S=8192 fwd+bwd TFLOP/s", "mixed_attention", "plain causal S=8192", "full", tflops=280.0),
    Target("patch embedding 224/14/1024 uint8 forward vs eager", "patch_embed", "image 224/14/1024 from uint8",
           "forward", "eager", speedup=5.0),
    Target("patch embedding 224/14/1024 uint8 forward vs compiled", "patch_embed", "image 224/14/1024 from uint8",
           "forward", "compiled eager", speedup=3.0),
    Target("patch embedding 224/14/1024 uint8 fwd+bwd vs eager", "patch_embed", "image 224/14/1024 from uint8",
           "full", "eager", speedup=2.0),
    Target("MAE kept-patch embedding ViT-B/16 224, B=256, 75 % masked, fwd+bwd vs timm + gather", "patch_embed",
           "image 224/16/768, 75 % masked from uint8", "full", "embed+gather", speedup=3.0),
    Target("video tubelets 2x16x16 forward vs eager Conv3d", "patch_embed", "video 16x224x224/2x16x16 from uint8",
           "forward", "eager", speedup=5.0),
    Target("clip N=32768 D=768 fwd+bwd vs materialized", "contrastive", "clip N=32768 D=768", "full", "eager",
           speedup=3.0),
    Target("clip N=32768 D=768 memory above inputs (MB)", "contrastive", "clip N=32768 D=768", "full",
           memory_mb=1024.0),
    Target("siglip N=65536 D=768 fwd+bwd vs eager", "contrastive", "siglip N=65536 D=768", "full", "eager",
           speedup=2.0),
    Target("siglip N=65536 D=768 memory above inputs (MB)", "contrastive", "siglip N=65536 D=768", "full",
           memory_mb=2048.0),
    Target("CLIP ViT-B/16 training step, batch 256, vs HF", "clip_train", "CLIP ViT-B/16 batch 256", "full",
           "hf sdpa + open_clip loss", speedup=1.3),
    Target("linear cross-entropy T=16k D=4096 V=128k fwd+bwd vs eager", "linear_cross_entropy",
           "T=16384 D=4096 V=128256", "full", "eager", speedup=1.5),
    Target("linear cross-entropy memory vs Liger (mmfast / Liger <= 1)", "linear_cross_entropy",
           "T=16384 D=4096 V=128256", "full", "liger", memory_mb=-1.0),
    Target("decode B=8 S=32768 vs SDPA with a mask", "decode", "B=8 S=32768 H=32/8 D=128 new=1", "forward",
           "sdpa_mask", speedup=2.0),
    Target("LLaVA ViT-L/14-336 + 1.1B training step, batch 8, vs HF padded", "llava_train",
           "LLaVA ViT-L/14-336 + 1.1B batch 8", "full", "hf sdpa padded", speedup=1.5),
    Target("LLaVA training step peak memory vs HF padded (mmfast / HF <= 0.8)", "llava_train",
           "LLaVA ViT-L/14-336 + 1.1B batch 8", "full", "hf sdpa padded", memory_ratio=0.8),
    Target("AST front end B=64 x 10 s vs HF ASTFeatureExtractor + ASTEmbeddings", "audio_frontend",
           "B=64 x 10 s, 128 mels, AST width 768", "forward",
           "HF ASTFeatureExtractor (torchaudio Kaldi fbank) + ASTEmbeddings", speedup=3.0),
    Target("Griffin-Lim B=16 x 4 s vs librosa", "griffin_lim", "B=16 x 4 s, n_fft 1024", "forward", "librosa",
           speedup=1.0),
    Target("CLIP ViT-B/16 pair scoring, batch 256, vs open_clip", "data_score", "CLIP ViT-B/16 batch 256", "forward",
           "open_clip", speedup=2.0),
    Target("unified 1.1B training step, 8k packed tokens, vs FlexAttention (mask built every step)", "unified_train",
           "unified 1.1B, 1 x 8192 tokens", "full", "flex", speedup=1.3),
    Target("decode B=8 S=32768 vs flash_attn_with_kvcache", "decode", "B=8 S=32768 H=32/8 D=128 new=1", "forward",
           "flash_attn", speedup=1.0),
)


def _row(rows, suite, group, mode, provider):
    return next((row for row in rows if row["suite"] == suite and row["group"] == group and row["mode"] == mode
                 and row["provider"] == provider and row.get("status") == "ok"), None)


def evaluate(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """(target, wanted, measured, met) per target; "not measured" where its rows are missing."""
    result = []
    for target in TARGETS:
        ours = _row(rows, target.suite, target.group, target.mode, "mmfast")
        theirs = _row(rows, target.suite, target.group, target.mode, target.baseline) if target.baseline else None
        if ours is None or (target.baseline and theirs is None):
            wanted = f">= {target.speedup}x" if target.speedup else (
                f">= {target.tflops} TFLOP/s" if target.tflops else "memory bound")
            result.append((target.name, wanted, "not measured", "-"))
            continue
        if target.speedup is not None:
            value = theirs["median_ms"] / ours["median_ms"]
            result.append((target.name, f">= {target.speedup}x", f"{value:.2f}x", "yes" if value >= target.speedup
                           else "no"))
        elif target.tflops is not None:
            value = ours.get("tflops") or 0.0
            result.append((target.name, f">= {target.tflops} TFLOP/s", f"{value:.0f}", "yes" if value >= target.tflops
                           else "no"))
        else:
            mine = ours.get("peak_memory_mb")
            baseline = (theirs or {}).get("peak_memory_mb")
            if target.memory_ratio is not None:
                bound = None if baseline is None else target.memory_ratio * baseline
            else:
                bound = target.memory_mb if target.memory_mb >= 0 else baseline
            if mine is None or bound is None:
                result.append((target.name, "memory bound", "not measured", "-"))
                continue
            result.append((target.name, f"<= {bound:.0f} MB", f"{mine:.0f} MB", "yes" if mine <= bound else "no"))
    return result


def table(rows: list[dict]) -> str:
    lines = ["| target | wanted | measured | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {wanted} | {measured} | {met} |" for name, wanted, measured, met in evaluate(rows)]
    return "\n".join(lines)


def load(paths) -> list[dict]:
    """Every row of the results.json files under the given files or folders."""
    rows = []
    for path in paths:
        files = [path] if path.endswith(".json") else glob.glob(os.path.join(path, "**", "results.json"),
                                                                 recursive=True)
        for name in files:
            with open(name) as handle:
                rows += json.load(handle)
    return rows


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m mmfast.bench.targets RESULTS_DIR_OR_JSON [...]", file=sys.stderr)
        return 2
    print(table(load(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
