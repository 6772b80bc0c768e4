"""Wrapper of the csrc op `mmfast::log_mel` (C++ on CPU tensors, CUDA on GPU tensors), with its fake
implementation for torch.compile and opcheck."""
from __future__ import annotations

import torch

from mmfast import _extension
from mmfast.ops.log_mel.reference import frame_count

LOG_MODES = {None: 0, "log10": 1, "ln": 2}
_fake_registered = []


def _register_fake():
    if _fake_registered:
        return

    @torch.library.register_fake("mmfast::log_mel")
    def _(waveform, window, filters, n_fft, hop_length, center, reflect, power, log_mode, clamp_min):
        # Also what runs when one argument is a meta tensor and the others are real: refuse, rather than
        # return an uninitialized tensor.
        if not (window.device == filters.device == waveform.device):
            raise ValueError(f"mmfast::log_mel: waveform, window and filters must be on one device, got "
                             f"{waveform.device}, {window.device} and {filters.device}")
        frames = frame_count(waveform.shape[1], n_fft, hop_length, center)
        return waveform.new_empty((waveform.shape[0], filters.shape[1], frames))

    _fake_registered.append(True)


def available(compile: bool = False) -> bool:
    ready = _extension.load() if compile else _extension.loaded()
    if ready:
        _register_fake()
    return ready


def log_mel(waveform, window, filters, n_fft, hop_length, center, pad_mode, power, log, clamp_min):
    """Same contract as triton.log_mel: float32 [B, T] in, float32 [B, n_mels, frames] out."""
    if not available(compile=True):
        raise RuntimeError("log_mel_spectrogram: backend 'native' needs the C++ extension, which could not be built "
                           "(a C++ compiler and ninja are needed; see csrc/README.md)")
    return torch.ops.mmfast.log_mel(waveform, window.to(waveform.device), filters.float().to(waveform.device), n_fft,
                                    hop_length, center, pad_mode == "reflect", float(power), LOG_MODES[log],
                                    clamp_min)
