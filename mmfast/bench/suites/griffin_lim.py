"""Griffin-Lim phase reconstruction (the vocoder behind spectrogram generation): mmfast.audio.griffin_lim
(batched torch.stft / istft, on the GPU when there is one) against librosa's griffinlim (numpy, one clip
at a time, where installed) on the same magnitudes, 32 iterations of fast Griffin-Lim each. Forward only.
Rate: seconds of audio rebuilt per second.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from mmfast.audio import griffin_lim
from mmfast.bench.case import Case

RATE, N_FFT, HOP, ITERATIONS = 16000, 1024, 256, 32


def _case(batch: int, seconds: int, provider: str, device):
    def make():
        generator = torch.Generator().manual_seed(0)
        audio = torch.randn(batch, seconds * RATE, generator=generator) * 0.1
        magnitude = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True).abs()
        if provider == "mmfast":
            magnitude = magnitude.to(device)
            step = lambda: griffin_lim(magnitude, n_fft=N_FFT, hop_length=HOP, iterations=ITERATIONS,  # noqa: E731
                                       generator=torch.Generator().manual_seed(0))
        else:
            import librosa

            clips = magnitude.numpy()
            step = lambda: torch.from_numpy(np.stack([librosa.griffinlim(  # noqa: E731
                clip, n_iter=ITERATIONS, hop_length=HOP, n_fft=N_FFT, random_state=0) for clip in clips]))
        return step, []

    return Case(suite="griffin_lim", group=f"B={batch} x {seconds} s, n_fft {N_FFT}", provider=provider,
                params={"B": batch, "seconds": seconds, "iterations": ITERATIONS}, make=make, modes=("forward",),
                is_mmfast=provider == "mmfast", rates={"audio_seconds_per_s": batch * seconds})


def cases(profile: str, device: torch.device):
    providers = ["mmfast"] + (["librosa"] if importlib.util.find_spec("librosa") else [])
    grid = [(2, 1)] if profile == "cpu" else [(16, 4)] if profile == "quick" else [(1, 4), (16, 4), (64, 4)]
    return [_case(batch, seconds, provider, device) for batch, seconds in grid for provider in providers]
