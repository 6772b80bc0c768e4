"""Log-mel spectrogram of 30 s clips at 16 kHz (n_fft 400, hop 160): mmfast (Triton and CUDA C++ on a
GPU; the C++ kernel and the PyTorch path on a CPU) against torchaudio's
MelSpectrogram (+ log10), whisper's torch path (torch.stft + mel matmul + log10 + normalization),
HF's WhisperFeatureExtractor (numpy path) and librosa, where installed. Forward only.

Rates: hours of audio per second. Bytes: waveform read + features written.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

import mmfast
from mmfast.bench.case import Case
from mmfast.ops.log_mel import mel_filters

SAMPLE_RATE, N_FFT, HOP = 16000, 400, 160


def whisper_torch_path(audio: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """openai-whisper's log_mel_spectrogram (per-clip peak): stft, power, mel matmul, log10, normalize."""
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT, device=audio.device), return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(filters @ magnitudes, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def _case(batch, n_mels, seconds, provider, device):

    samples = seconds * SAMPLE_RATE

    def make():
        generator = torch.Generator(device=device).manual_seed(0)
        audio = torch.randn(batch, samples, device=device, generator=generator) * 0.1
        if provider.startswith("mmfast"):
            backend = {"mmfast": "triton", "mmfast C++": "native", "mmfast CUDA C++": "native",
                       "mmfast PyTorch path": "reference"}[provider]
            step = lambda: mmfast.ops.log_mel_spectrogram(audio, n_mels=n_mels, normalize="whisper",  # noqa: E731
                                                          backend=backend)
        elif provider == "whisper torch path":
            filters = mel_filters(n_mels=n_mels).T.float().to(device)
            step = lambda: whisper_torch_path(audio, filters)  # noqa: E731
        elif provider == "torchaudio":
            import torchaudio

            transform = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, N_FFT, hop_length=HOP, n_mels=n_mels,
                                                             norm="slaney", mel_scale="slaney").to(device)
            step = lambda: transform(audio).clamp_min(1e-10).log10()  # noqa: E731
        elif provider == "hf numpy":
            from transformers import WhisperFeatureExtractor

            extractor = WhisperFeatureExtractor(feature_size=n_mels)
            clips = audio.cpu().numpy()
            step = lambda: extractor._np_extract_fbank_features(clips, "cpu")  # noqa: E731
        elif provider == "librosa":
            import librosa

            clips = audio.cpu().numpy()
            step = lambda: np.log10(np.maximum(librosa.feature.melspectrogram(  # noqa: E731
                y=clips, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=n_mels, pad_mode="reflect"), 1e-10))
        else:
            raise ValueError(f"unknown provider {provider!r}")
        return step, []

    frames = samples // HOP + 1
    return Case(
        suite="log_mel", group=f"B={batch} x {seconds} s, {n_mels} mels", provider=provider,
        params={"B": batch, "seconds": seconds, "n_mels": n_mels},
        make=make, bytes=lambda mode: batch * (samples + n_mels * frames) * 4.0, modes=("forward",),
        is_mmfast=provider in ("mmfast", "mmfast C++") or (provider == "mmfast PyTorch path" and not _cpp_buildable()),
        rates={"audio_hours_per_s": batch * seconds / 3600},
    )


def _cpp_buildable() -> bool:
    """The C++ kernel is there, or can be compiled (ninja and a C++ compiler)."""
    import shutil

    from mmfast import _extension

    return _extension.loaded() or (importlib.util.find_spec("ninja") is not None and shutil.which("c++") is not None)


def _providers(device: torch.device) -> list[str]:
    """The Triton kernel is mmfast's GPU row and the C++ kernel its CPU row; the CUDA C++ kernel runs
    beside Triton so the table says which GPU path should be the default."""
    if device.type == "cuda":
        mmfast_rows = ["mmfast", "mmfast CUDA C++"]
    else:
        mmfast_rows = (["mmfast C++"] if _cpp_buildable() else []) + ["mmfast PyTorch path"]
    providers = mmfast_rows + ["whisper torch path"]
    if importlib.util.find_spec("torchaudio"):
        providers.append("torchaudio")
    if device.type == "cpu":
        providers += [name for name, module in (("hf numpy", "transformers"), ("librosa", "librosa"))
                      if importlib.util.find_spec(module)]
    return providers


def cases(profile: str, device: torch.device):
    if profile == "cpu":
        grid = [(8, 80, 30)] if device.type == "cpu" else [(1, 80, 30)]
        return [_case(b, m, s, provider, device) for b, m, s in grid for provider in _providers(device)]
    grid = [(64, 80, 30)] if profile == "quick" else [(b, m, 30) for b in (1, 8, 64) for m in (80, 128)]
    return [_case(b, m, s, provider, device) for b, m, s in grid for provider in _providers(device)]
