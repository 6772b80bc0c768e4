"""An AST encoder's front end: a batch of waveforms -> the tokens its transformer takes (log-mel
spectrogram, normalization, overlapping 16 x 16 patches at stride 10, projection, class and
distillation tokens, positions). mmfast: the fused log-mel and the fused patch embedding on the
device (`mmfast.models.AudioEncoder` without blocks). Baseline: what AST users run today, HF's
`ASTFeatureExtractor` (Kaldi's fbank through torchaudio where installed, its numpy path otherwise) on
the host, then HF's `ASTEmbeddings` (a Conv2d) on the device. Also measured: mmfast with AST's own
features (`front_end="kaldi"`: `mmfast.audio.kaldi_fbank` on the device, what a model converted from HF
uses), its ratio to the fused front end shown as a baseline's. Forward only.

Rate: hours of audio per second.
"""
from __future__ import annotations

import importlib.util

import torch

from mmfast.bench.case import Case

SAMPLE_RATE = 16000
KALDI = "mmfast kaldi_fbank (AST's own features)"


def _hf_embeddings(mel_bins: int, frames: int, width: int, device, dtype):
    from transformers import ASTConfig
    from transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer import ASTEmbeddings

    config = ASTConfig(num_mel_bins=mel_bins, max_length=frames, hidden_size=width)
    return ASTEmbeddings(config).to(device, dtype).eval()


def _case(batch, seconds, mel_bins, frames, width, provider, device, dtype):
    samples = seconds * SAMPLE_RATE

    def make():
        generator = torch.Generator(device=device).manual_seed(0)
        audio = torch.randn(batch, samples, device=device, generator=generator) * 0.1
        if provider in ("mmfast", KALDI):
            from mmfast.models.audio import AudioConfig, AudioEncoder

            front_end = "kaldi" if provider == KALDI else "fused"
            encoder = AudioEncoder(AudioConfig(num_mel_bins=mel_bins, max_length=frames, width=width, layers=0,
                                               heads=1, front_end=front_end)).to(device, dtype)
            step = lambda: encoder.embeddings(encoder.features(audio).to(dtype))  # noqa: E731
        else:
            from transformers import ASTFeatureExtractor

            extractor = ASTFeatureExtractor(num_mel_bins=mel_bins, max_length=frames, sampling_rate=SAMPLE_RATE)
            embeddings = _hf_embeddings(mel_bins, frames, width, device, dtype)
            clips = list(audio.cpu().numpy())

            def step():
                values = extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_values"]
                return embeddings(values.to(device, dtype))
        return step, []

    return Case(
        suite="audio_frontend", group=f"B={batch} x {seconds} s, {mel_bins} mels, AST width {width}", provider=provider,
        params={"B": batch, "seconds": seconds, "mel_bins": mel_bins, "frames": frames, "width": width,
                "dtype": str(dtype).removeprefix("torch.")},
        make=make, bytes=lambda mode: batch * samples * 4.0, modes=("forward",), is_mmfast=provider == "mmfast",
        rates={"audio_hours_per_s": batch * seconds / 3600},
    )


def _baseline() -> str:
    if importlib.util.find_spec("torchaudio"):
        return "HF ASTFeatureExtractor (torchaudio Kaldi fbank) + ASTEmbeddings"
    return "HF ASTFeatureExtractor (numpy) + ASTEmbeddings"


def cases(profile: str, device: torch.device):
    providers = ["mmfast", KALDI] + ([_baseline()] if importlib.util.find_spec("transformers") else [])
    if profile == "cpu":
        return [_case(2, 2, 128, 200, 64, provider, device, torch.float32) for provider in providers]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [_case(64, 10, 128, 1024, 768, provider, device, dtype) for provider in providers]
