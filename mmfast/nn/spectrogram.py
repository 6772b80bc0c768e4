"""`MelSpectrogram`: torchaudio's `transforms.MelSpectrogram` (arguments, defaults and output) on
`mmfast.ops.log_mel_spectrogram`."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from mmfast.ops.log_mel import empty_filters, log_mel_spectrogram, mel_filters


class MelSpectrogram(nn.Module):
    """Mel spectrogram of `[..., time]` waveforms -> `[..., n_mels, frames]`, no log (torchaudio's
    defaults: htk scale, no filter norm, power 2). Empty filters warn, as torchaudio does."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, win_length: int | None = None,
                 hop_length: int | None = None, f_min: float = 0.0, f_max: float | None = None, pad: int = 0,
                 n_mels: int = 128, window_fn=torch.hann_window, power: float = 2.0, normalized: bool = False,
                 wkwargs: dict | None = None, center: bool = True, pad_mode: str = "reflect",
                 onesided: bool | None = None, norm: str | None = None, mel_scale: str = "htk", *,
                 backend: str | None = None):
        super().__init__()
        if onesided is False:
            raise ValueError("MelSpectrogram: only onesided spectra are supported (onesided=True or None)")
        self.sample_rate, self.n_fft, self.n_mels = sample_rate, n_fft, n_mels
        self.win_length = win_length or n_fft
        self.hop_length = hop_length or self.win_length // 2
        self.f_min, self.f_max, self.pad, self.power = f_min, f_max, pad, power
        self.normalized, self.center, self.pad_mode = normalized, center, pad_mode
        self.norm, self.mel_scale, self.backend = norm, mel_scale, backend
        self.register_buffer("window", window_fn(self.win_length, **(wkwargs or {})), persistent=False)
        filters = mel_filters(sample_rate, n_fft, n_mels, f_min, f_max, mel_scale, norm, allow_empty=True)
        if empty_filters(filters):
            warnings.warn(f"MelSpectrogram: mel filters {empty_filters(filters)[:8]} are all zero: n_mels={n_mels} "
                          f"is too high for n_fft={n_fft}", stacklevel=2)
        self.register_buffer("filters", filters.float(), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        leading = waveform.shape[:-1]
        flat = waveform.reshape(-1, waveform.shape[-1])
        if self.pad:
            flat = nn.functional.pad(flat, (self.pad, self.pad))
        mel = log_mel_spectrogram(flat, sample_rate=self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length,
                                  win_length=self.win_length, window=self.window, n_mels=self.n_mels,
                                  f_min=self.f_min, f_max=self.f_max, center=self.center, pad_mode=self.pad_mode,
                                  power=self.power, log=None, clamp_min=None, filters=self.filters,
                                  backend=self.backend)
        if self.normalized:  # torchaudio's "window" normalization of the spectrogram
            energy = self.window.pow(2).sum()
            mel = mel / (energy if self.power == 2.0 else energy.sqrt())
        return mel.reshape(*leading, *mel.shape[-2:]).to(waveform.dtype)
