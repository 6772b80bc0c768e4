"""Benchmark suites by name: each maps (profile, device) to a list of cases."""
from mmfast.bench.suites import (audio_frontend, clip_train, contrastive, data_score, decode, griffin_lim,
                                 linear_cross_entropy, llava_train, log_mel, mixed_attention, patch_embed,
                                 unified_train)

SUITES = {
    "contrastive": contrastive.cases,
    "patch_embed": patch_embed.cases,
    "mixed_attention": mixed_attention.cases,
    "log_mel": log_mel.cases,
    "clip_train": clip_train.cases,
    "linear_cross_entropy": linear_cross_entropy.cases,
    "decode": decode.cases,
    "llava_train": llava_train.cases,
    "griffin_lim": griffin_lim.cases,
    "data_score": data_score.cases,
    "audio_frontend": audio_frontend.cases,
    "unified_train": unified_train.cases,
}
