"""Log-mel spectrogram: waveform -> frames (center, reflect padding) -> window -> DFT -> power ->
mel filterbank -> log -> clamp -> optional per-clip (whisper) normalization."""
from __future__ import annotations

import functools

import torch

from mmfast.ops._backend import profiled, resolve_backend
from mmfast.ops.log_mel import reference
from mmfast.ops.log_mel.reference import frame_count

__all__ = ["log_mel_spectrogram", "mel_filters", "whisper_normalize", "frame_count"]

OP = "log_mel_spectrogram"
_IMPLEMENTED = ("triton", "native", "reference")
NORMALIZE = (None, "whisper", "whisper_batch")


@functools.lru_cache(maxsize=32)
def _filters(sample_rate, n_fft, n_mels, f_min, f_max, mel_scale, mel_norm) -> torch.Tensor:
    return reference.mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, mel_scale, mel_norm)


def empty_filters(filters: torch.Tensor) -> list[int]:
    """Indices of mel filters that no frequency bin reaches (n_mels too large for n_fft)."""
    return (filters.max(dim=0).values <= 0).nonzero().flatten().tolist()


def mel_filters(sample_rate: int = 16000, n_fft: int = 400, n_mels: int = 80, f_min: float = 0.0,
                f_max: float | None = None, mel_scale: str = "slaney", mel_norm: str | None = "slaney", *,
                allow_empty: bool = False) -> torch.Tensor:
    """The float64 filterbank `[n_fft // 2 + 1, n_mels]` (librosa.filters.mel(...).T); raises when a
    filter is empty unless allow_empty (torchaudio only warns there)."""
    filters = _filters(sample_rate, n_fft, n_mels, float(f_min), float(f_max or sample_rate / 2), mel_scale, mel_norm)
    empty = empty_filters(filters)
    if empty and not allow_empty:
        raise ValueError(f"{OP}: n_mels={n_mels} is too large for n_fft={n_fft} at sample_rate={sample_rate}: "
                         f"mel filters {empty[:8]} are empty (lower n_mels or raise n_fft)")
    return filters


def whisper_normalize(log_mel: torch.Tensor, frame_mask: torch.Tensor | None = None,
                      batch_max: bool = False) -> torch.Tensor:
    """whisper's `max(x, peak - 8)` then `(x + 4) / 4` on a `[B, n_mels, frames]` log10 spectrogram.
    The peak is per clip over its valid frames, or over the whole batch (batch_max, as
    openai-whisper computes it for a batched tensor)."""
    values = log_mel if frame_mask is None else log_mel.masked_fill(~frame_mask[:, None, :], float("-inf"))
    peak = values.amax() if batch_max else values.amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(log_mel, peak - 8.0) + 4.0) / 4.0


def _check(waveform, sample_rate, n_fft, hop_length, win_length, n_mels, f_min, f_max, power, log, normalize,
           pad_mode, mel_scale, mel_norm):
    if not isinstance(waveform, torch.Tensor):
        raise TypeError(f"{OP}: waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if not waveform.is_floating_point():
        raise TypeError(f"{OP}: waveform must be a float tensor, got {waveform.dtype}")
    if waveform.dim() not in (1, 2):
        raise ValueError(f"{OP}: waveform must be [T] or [B, T], got shape {tuple(waveform.shape)}")
    if waveform.shape[-1] < 1:
        raise ValueError(f"{OP}: waveform must hold at least one sample, got shape {tuple(waveform.shape)}")
    for name, value in (("n_fft", n_fft), ("hop_length", hop_length), ("n_mels", n_mels),
                        ("sample_rate", sample_rate), ("win_length", win_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{OP}: {name} must be an int >= 1, got {value!r}")
    if win_length > n_fft:
        raise ValueError(f"{OP}: win_length must be <= n_fft ({n_fft}), got {win_length}")
    if not 0 <= f_min < f_max:
        raise ValueError(f"{OP}: need 0 <= f_min < f_max, got f_min={f_min}, f_max={f_max}")
    if f_max > sample_rate / 2:
        raise ValueError(f"{OP}: f_max must be at most the Nyquist frequency {sample_rate / 2}, got {f_max}")
    if power not in (1.0, 2.0):
        raise ValueError(f"{OP}: power must be 1.0 (magnitude) or 2.0 (power), got {power}")
    if log not in (None, "log10", "ln"):
        raise ValueError(f"{OP}: log must be 'log10', 'ln' or None, got {log!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"{OP}: normalize must be one of {NORMALIZE}, got {normalize!r}")
    if normalize and log != "log10":
        raise ValueError(f"{OP}: normalize={normalize!r} needs log='log10', got log={log!r}")
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"{OP}: pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")
    if mel_scale not in ("slaney", "htk") or mel_norm not in ("slaney", None):
        raise ValueError(f"{OP}: mel_scale must be 'slaney' or 'htk' and mel_norm 'slaney' or None, got "
                         f"{mel_scale!r}, {mel_norm!r}")


def _checked_tensor(name: str, tensor, shape: tuple, described: str, device: torch.device) -> torch.Tensor:
    """A float tensor of `shape`, on `device` (a CPU tensor is moved there)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"{OP}: {name} must be a float tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{OP}: {name} must be {described} = {list(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device and tensor.device.type != "cpu":
        raise ValueError(f"{OP}: {name} must be on the waveform's device {device} (or the CPU), got {tensor.device}")
    return tensor.to(device)


@profiled
def log_mel_spectrogram(waveform: torch.Tensor, *, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160,
                        win_length: int | None = None, window="hann", n_mels: int = 80, f_min: float = 0.0,
                        f_max: float | None = None, center: bool = True, pad_mode: str = "reflect",
                        power: float = 2.0, mel_scale: str = "slaney", mel_norm: str | None = "slaney",
                        log: str | None = "log10", clamp_min: float | None = 1e-10, normalize: str | None = None,
                        lengths: torch.Tensor | None = None, return_frame_mask: bool = False,
                        filters: torch.Tensor | None = None, backend: str | None = None):
    """`[B, n_mels, frames]` float32 (log-)mel spectrogram of `[B, T]` (or `[T]`) float waveforms
    (float64 in, float64 out on the reference backend).

    frames = 1 + T // hop_length with center=True (torch.stft's count). window: "hann" (periodic),
    "ones" or a tensor of win_length samples (centered in n_fft). log: "log10", "ln" or None, applied
    after clamping at clamp_min (None: no clamp). normalize: "whisper" (per clip: max(x, peak - 8),
    then (x + 4) / 4) or "whisper_batch" (the peak over the whole batch, as openai-whisper does).
    lengths: valid samples per clip ([B]); frames whose first sample lies past a clip's end are left
    out of its peak and, with return_frame_mask, marked False in the returned [B, frames] mask.
    backend "native" (alias "cuda") is the csrc extension: a multi-threaded C++ kernel on CPU tensors
    (what "auto" picks on the CPU once the extension is built), a CUDA kernel on GPU tensors.
    filters: a custom filterbank `[n_fft // 2 + 1, n_mels]` instead of the one the mel arguments
    describe. The waveform receives a gradient.
    """
    win_length = n_fft if win_length is None else win_length
    f_max = float(f_max if f_max is not None else sample_rate / 2)
    _check(waveform, sample_rate, n_fft, hop_length, win_length, n_mels, float(f_min), f_max, power, log, normalize,
           pad_mode, mel_scale, mel_norm)
    single = waveform.dim() == 1
    batch = waveform[None] if single else waveform
    if filters is None:
        filters = mel_filters(sample_rate, n_fft, n_mels, f_min, f_max, mel_scale, mel_norm)
    else:
        filters = _checked_tensor("filters", filters, (n_fft // 2 + 1, n_mels), "[n_fft // 2 + 1, n_mels]",
                                  batch.device)
    if isinstance(window, torch.Tensor):
        window = _checked_tensor("window", window, (win_length,), "[win_length]", batch.device)
    if batch.shape[0] == 0:  # no clips: an empty result on every backend
        empty = batch.new_empty((0, n_mels, frame_count(batch.shape[-1], n_fft, hop_length, center)),
                                dtype=torch.float64 if batch.dtype == torch.float64 else torch.float32)
        return (empty, empty.new_empty((0, empty.shape[-1]), dtype=torch.bool)) if return_frame_mask else empty
    window_values = reference.window_tensor(window, win_length, n_fft, torch.float32, batch.device)
    frames = frame_count(batch.shape[-1], n_fft, hop_length, center)
    if frames < 1:
        raise ValueError(f"{OP}: a {batch.shape[-1]}-sample waveform gives no frame without center=True "
                         f"(n_fft={n_fft})")
    frame_mask = None
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=batch.device)
        if lengths.shape != (batch.shape[0],) or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"{OP}: lengths must be [{batch.shape[0]}] integers (samples per clip), got "
                             f"{lengths.dtype} {tuple(lengths.shape)}")
        if bool((lengths < 0).any()):
            raise ValueError(f"{OP}: lengths must be >= 0 (samples per clip), got {lengths.tolist()[:16]}")
        starts = torch.arange(frames, device=batch.device) * hop_length
        frame_mask = starts[None, :] < lengths[:, None]

    from mmfast.ops.log_mel import cuda as extension

    chosen = resolve_backend(OP, backend, batch.device, _IMPLEMENTED, cpu_kernel_ready=extension.available)
    with torch.autocast(batch.device.type, enabled=False):  # a float32 front end, even inside a bf16 model
        out = _log_mel(chosen, batch, window_values, filters, n_fft, hop_length, center, pad_mode, power, log,
                       clamp_min)
    if normalize:
        out = whisper_normalize(out, frame_mask, batch_max=normalize == "whisper_batch")
    if single:
        out = out[0]
        frame_mask = None if frame_mask is None else frame_mask[0]
    return (out, frame_mask) if return_frame_mask else out


def _log_mel(chosen, batch, window_values, filters, n_fft, hop_length, center, pad_mode, power, log, clamp_min):
    """The log-mel of `batch` on the chosen backend (arguments checked by log_mel_spectrogram)."""
    from mmfast.ops.log_mel import cuda as extension

    if chosen in ("triton", "native"):
        from mmfast.ops.log_mel.function import LogMelFunction

        if chosen == "triton":
            from mmfast.ops.log_mel.triton import log_mel as kernel
        else:
            kernel = extension.log_mel
        return LogMelFunction.apply(batch, window_values, filters, n_fft, hop_length, center, pad_mode, power, log,
                                    clamp_min, kernel)
    precision = torch.float64 if batch.dtype == torch.float64 else torch.float32  # float64: the test oracle
    mel = reference.mel_power(batch, window_values, filters, n_fft, hop_length, center, pad_mode, power, precision)
    return reference.apply_log(mel, log, clamp_min)
