"""Plain PyTorch log-mel spectrogram: frames gathered by index (reflect padding without a padded
copy), window, real FFT, power, mel filterbank, log, clamp. The oracle (in float64), the CPU
path, and the backward of the Triton path (autograd through it gives the waveform gradient).
Filterbanks follow librosa / torchaudio (htk or slaney scale, slaney or no area norm)."""
from __future__ import annotations

import math

import torch


def hz_to_mel(frequencies: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + frequencies / 700.0)
    linear = 3.0 * frequencies / 200.0  # slaney: linear below 1 kHz, logarithmic above
    logarithmic = 15.0 + torch.log(frequencies.clamp_min(1e-10) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(frequencies >= 1000.0, logarithmic, linear)


def mel_to_hz(mels: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    linear = 200.0 * mels / 3.0
    logarithmic = 1000.0 * torch.exp((mels - 15.0) * (math.log(6.4) / 27.0))
    return torch.where(mels >= 15.0, logarithmic, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float, scale: str,
                   norm: str | None, dtype=torch.float64) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] triangular filters (librosa.filters.mel, transposed)."""
    frequencies = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(hz_to_mel(torch.tensor(f_min, dtype=torch.float64), scale).item(),
                                     hz_to_mel(torch.tensor(f_max, dtype=torch.float64), scale).item(),
                                     n_mels + 2, dtype=torch.float64), scale)
    widths = edges[1:] - edges[:-1]
    ramps = edges[:, None] - frequencies[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    if norm == "slaney":
        weights = weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T.contiguous().to(dtype)


def reflect_indices(positions: torch.Tensor, length: int) -> torch.Tensor:
    """numpy's 'reflect' padding as indices, repeated for pads longer than the signal."""
    if length == 1:
        return torch.zeros_like(positions)
    period = 2 * (length - 1)
    folded = torch.remainder(positions, period)
    return torch.where(folded < length, folded, period - folded)


def frame_count(samples: int, n_fft: int = 400, hop_length: int = 160, center: bool = True) -> int:
    """Frames of a `samples`-long clip: 1 + samples // hop_length with center=True (torch.stft's count)."""
    pad = n_fft // 2 if center else 0
    return (samples + 2 * pad - n_fft) // hop_length + 1


def frame_indices(length: int, n_fft: int, hop_length: int, center: bool, pad_mode: str, device) -> torch.Tensor:
    """[frames, n_fft] sample index of each frame element; -1 where a constant pad gives zero."""
    pad = n_fft // 2 if center else 0
    frames = frame_count(length, n_fft, hop_length, center)
    positions = (torch.arange(frames, device=device)[:, None] * hop_length + torch.arange(n_fft, device=device)[None, :]
                 - pad)
    if pad_mode == "reflect":
        return reflect_indices(positions, length)
    return torch.where((positions >= 0) & (positions < length), positions, torch.full_like(positions, -1))


def window_tensor(window, win_length: int, n_fft: int, dtype, device) -> torch.Tensor:
    """The window of win_length samples, zero-padded on both sides to n_fft (as torch.stft does)."""
    if isinstance(window, torch.Tensor):
        values = window.to(device=device, dtype=dtype)
    elif window == "hann":
        values = torch.hann_window(win_length, periodic=True, dtype=dtype, device=device)
    elif window in ("ones", "rectangular", None):
        values = torch.ones(win_length, dtype=dtype, device=device)
    else:
        raise ValueError(f"window must be 'hann', 'ones' or a tensor, got {window!r}")
    left = (n_fft - values.shape[0]) // 2
    return torch.nn.functional.pad(values, (left, n_fft - values.shape[0] - left))


def mel_power(waveform, window, filters, n_fft, hop_length, center, pad_mode, power, dtype=torch.float32):
    """[B, n_mels, frames] mel-filtered power (or magnitude) spectrogram in `dtype`."""
    signal = waveform.to(dtype)
    length = signal.shape[-1]
    if not center or pad_mode == "constant" or length > n_fft // 2:
        # torch.stft frames a strided view: no copy of the padded signal's frames
        spectrum = torch.stft(signal, n_fft, hop_length, window=window.to(dtype), center=center, pad_mode=pad_mode,
                              return_complex=True)
    else:  # a reflection longer than the clip: torch.stft refuses it, numpy folds it again
        frames = signal[:, frame_indices(length, n_fft, hop_length, center, pad_mode, signal.device)]
        spectrum = torch.fft.rfft(frames * window.to(dtype), n=n_fft).transpose(1, 2)
    # re * re + im * im on the strided views: about 4x faster on a CPU than abs() ** 2 or view_as_real
    magnitude = torch.addcmul(spectrum.real * spectrum.real, spectrum.imag, spectrum.imag)  # [B, n_freq, frames]
    if power != 2.0:
        magnitude = magnitude.sqrt() if power == 1.0 else magnitude.clamp_min(0) ** (power / 2.0)
    return filters.T.to(dtype) @ magnitude


def apply_log(mel: torch.Tensor, log: str | None, clamp_min: float | None) -> torch.Tensor:
    if clamp_min is not None:
        mel = mel.clamp_min(clamp_min)
    if log == "log10":
        return torch.log10(mel)
    if log in ("ln", "log"):
        return torch.log(mel)
    return mel
