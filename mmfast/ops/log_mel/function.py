"""Autograd function of the log-mel spectrogram: a kernel's forward (Triton, or the csrc op), the
reference path's autograd for the waveform gradient (recomputed)."""
from __future__ import annotations

import torch

from mmfast.ops.log_mel import reference


class LogMelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, waveform, window, filters, n_fft, hop_length, center, pad_mode, power, log, clamp_min, kernel):
        ctx.save_for_backward(waveform, window)
        ctx.settings = (filters, n_fft, hop_length, center, pad_mode, power, log, clamp_min)
        return kernel(waveform.float().contiguous(), window, filters, n_fft, hop_length, center, pad_mode, power, log,
                      clamp_min)

    @staticmethod
    def backward(ctx, grad_out):
        waveform, window = ctx.saved_tensors
        filters, n_fft, hop_length, center, pad_mode, power, log, clamp_min = ctx.settings
        with torch.enable_grad():
            leaf = waveform.detach().requires_grad_()
            mel = reference.mel_power(leaf, window, filters, n_fft, hop_length, center, pad_mode, power)
            out = reference.apply_log(mel, log, clamp_min)
            (grad,) = torch.autograd.grad(out, leaf, grad_out)
        return grad, None, None, None, None, None, None, None, None, None, None
