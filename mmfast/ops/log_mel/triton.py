"""Triton kernel of the log-mel spectrogram: one pass from waveform to log-mel.

Programs own BF frames of one clip. For each slice of BQ frequencies they gather the frame
samples by index (reflect padding folded into the index, so no padded copy exists), apply the
window, take the DFT as two GEMMs with a precomputed cos / sin basis on the tensor cores
(3xTF32 keeps fp32 accuracy), form the power, and accumulate the mel filterbank GEMM; the log
and clamp run in registers before the [B, n_mels, frames] store. The per-clip maximum of
whisper's normalization is a second, small pass (torch).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfast.ops._backend import plans_for_gpu
from mmfast.ops.log_mel.reference import frame_count


@triton.jit
def _log_mel_kernel(wave_ptr, window_ptr, cos_ptr, sin_ptr, mel_ptr, out_ptr,
                    T, stride_wave, frames, n_fft, hop, pad, n_mels, NQ, clamp_min, log_scale,
                    REFLECT: tl.constexpr, POWER: tl.constexpr, LOG: tl.constexpr, CLAMP: tl.constexpr,
                    BF: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr, BMEL: tl.constexpr,
                    PRECISION: tl.constexpr):
    i_f = tl.program_id(0)
    i_b = tl.program_id(1)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < frames
    o_mel = tl.arange(0, BMEL)
    mel_acc = tl.zeros((BF, BMEL), tl.float32)
    period = tl.maximum(2 * (T - 1), 1)
    for q0 in range(0, NQ, BQ):
        o_q = q0 + tl.arange(0, BQ)
        real = tl.zeros((BF, BQ), tl.float32)
        imag = tl.zeros((BF, BQ), tl.float32)
        for k0 in range(0, n_fft, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < n_fft
            position = o_f[:, None] * hop + o_k[None, :] - pad
            if REFLECT:
                folded = position % period
                folded = tl.where(folded < 0, folded + period, folded)
                index = tl.where(folded < T, folded, period - folded)
                valid = m_f[:, None] & m_k[None, :]
            else:
                index = position
                valid = m_f[:, None] & m_k[None, :] & (position >= 0) & (position < T)
            samples = tl.load(wave_ptr + i_b.to(tl.int64) * stride_wave + index, mask=valid, other=0.0)
            samples = samples * tl.load(window_ptr + o_k, mask=m_k, other=0.0)[None, :]
            b_cos = tl.load(cos_ptr + o_k[:, None] * NQ + o_q[None, :], mask=m_k[:, None], other=0.0)
            b_sin = tl.load(sin_ptr + o_k[:, None] * NQ + o_q[None, :], mask=m_k[:, None], other=0.0)
            real = tl.dot(samples, b_cos, real, input_precision=PRECISION)
            imag = tl.dot(samples, b_sin, imag, input_precision=PRECISION)
        spectrum = real * real + imag * imag
        if POWER == 1:
            spectrum = tl.sqrt(spectrum)
        b_mel = tl.load(mel_ptr + o_q[:, None] * BMEL + o_mel[None, :])
        mel_acc = tl.dot(spectrum, b_mel, mel_acc, input_precision=PRECISION)
    if CLAMP:  # NaN (a corrupt clip) stays NaN, as on the other backends: tl.maximum would drop it
        mel_acc = tl.where(mel_acc != mel_acc, mel_acc, tl.maximum(mel_acc, clamp_min))
    if LOG:
        mel_acc = tl.log(mel_acc) * log_scale
    p_out = out_ptr + i_b.to(tl.int64) * n_mels * frames + o_mel[None, :] * frames + o_f[:, None]
    tl.store(p_out, mel_acc, mask=m_f[:, None] & (o_mel < n_mels)[None, :])


_BASIS_CACHE: dict = {}


def _basis(n_fft: int, filters: torch.Tensor, device: torch.device, block_q: int, block_mel: int):
    """cos and sin DFT bases [n_fft, NQ] and the filterbank [NQ, BMEL], zero-padded; cached. The
    entry holds `filters` itself, so its address cannot be reused by another tensor meanwhile."""
    key = (n_fft, filters.data_ptr(), filters._version, str(device), block_q, block_mel)
    if key not in _BASIS_CACHE:
        n_freq, n_mels = filters.shape
        padded_q = triton.cdiv(n_freq, block_q) * block_q
        k = torch.arange(n_fft, dtype=torch.float64)[:, None]
        q = torch.arange(padded_q, dtype=torch.float64)[None, :]
        angle = 2.0 * math.pi * ((k * q) % n_fft) / n_fft  # the remainder keeps the angle exact
        keep = (q < n_freq).to(torch.float64)
        cos = (torch.cos(angle) * keep).float().to(device)
        sin = (-torch.sin(angle) * keep).float().to(device)
        mel = torch.zeros(padded_q, block_mel, dtype=torch.float32)
        mel[:n_freq, :n_mels] = filters.float().cpu()
        if len(_BASIS_CACHE) > 8:
            _BASIS_CACHE.clear()
        _BASIS_CACHE[key] = (cos, sin, mel.to(device), padded_q, filters)
    return _BASIS_CACHE[key][:4]


def log_mel(waveform, window, filters, n_fft, hop_length, center, pad_mode, power, log, clamp_min):
    """waveform float32 [B, T] contiguous; window [n_fft]; filters [n_freq, n_mels]; returns fp32
    [B, n_mels, frames]."""
    B, T = waveform.shape
    n_mels = filters.shape[1]
    pad = n_fft // 2 if center else 0
    frames = frame_count(T, n_fft, hop_length, center)
    interpreting = not plans_for_gpu(waveform.device)
    block_mel = max(16, triton.next_power_of_2(n_mels))
    # On a GPU: 16 frames x 32 samples x 32 frequencies per step, the sizes ptxas compiles without
    # spilling for sm_80 and sm_90 with 128 mels (32 x 64 x 64 spilled up to 412 bytes per thread in
    # the three-pass tf32 products; `mmfast bench compile`).
    block_q = 64 if interpreting else 32
    cos, sin, mel, padded_q = _basis(n_fft, filters, waveform.device, block_q, block_mel)
    out = torch.empty((B, n_mels, frames), device=waveform.device, dtype=torch.float32)
    block_f = 64 if interpreting else 16
    _log_mel_kernel[(triton.cdiv(frames, block_f), B)](
        waveform, window.float().contiguous(), cos, sin, mel, out, T, waveform.stride(0), frames, n_fft,
        hop_length, pad, n_mels, padded_q, float(clamp_min or 0.0),
        1.0 / math.log(10.0) if log == "log10" else 1.0,
        REFLECT=pad_mode == "reflect", POWER=int(power), LOG=log is not None, CLAMP=clamp_min is not None,
        BF=block_f, BK=64 if interpreting else 32, BQ=block_q, BMEL=block_mel,
        PRECISION="ieee" if interpreting else "tf32x3", num_warps=4, num_stages=2,
    )
    return out
