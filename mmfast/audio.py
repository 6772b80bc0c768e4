"""Whisper-compatible audio features on `mmfast.ops.log_mel_spectrogram`.

- `whisper_log_mel(audio, n_mels=80, padding=0, device=None)`: openai-whisper's
  `log_mel_spectrogram` (its batch-wide peak included).
- `WhisperFeatureExtractor`: the call of HF's `WhisperFeatureExtractor` (raw speech list or
  array, sampling_rate, padding to 30 s, `input_features` and optionally `attention_mask`),
  on the CPU or a GPU.
- `kaldi_fbank(waveform, ...)`: Kaldi's log-mel filterbank as torchaudio's `compliance.kaldi.fbank`
  and HF's `ASTFeatureExtractor` compute it (AST's features), batched, on any device.
- `griffin_lim(magnitude, ...)`: a waveform whose STFT magnitude is `magnitude` (fast Griffin-Lim,
  batched, on torch.stft / torch.istft, on any device); `mel_to_linear(mel, filters)`: a mel
  spectrogram back to a linear one (least squares), the vocoder of a model that generates mels.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from mmfast.ops.log_mel import log_mel_spectrogram, whisper_normalize

SAMPLE_RATE, N_FFT, HOP_LENGTH, CHUNK_SECONDS = 16000, 400, 160, 30


def _whisper_features(batch: torch.Tensor, n_mels: int, n_fft: int, hop_length: int, sample_rate: int,
                      batch_max: bool, backend=None) -> torch.Tensor:
    log_mel = log_mel_spectrogram(batch, sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                                  backend=backend)
    return whisper_normalize(log_mel[..., :-1], batch_max=batch_max)  # whisper drops the last frame


def load_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A sound file as float32 mono samples at `sample_rate`, decoded by ffmpeg as openai-whisper's
    `load_audio` does (16-bit PCM, scaled to [-1, 1))."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        raise RuntimeError(f"load_audio: decoding {os.fspath(path)!r} needs the ffmpeg command (apt-get install "
                           "ffmpeg, brew install ffmpeg, ...), as openai-whisper does; or pass samples")
    command = ["ffmpeg", "-nostdin", "-threads", "0", "-i", os.fspath(path), "-f", "s16le", "-ac", "1",
               "-acodec", "pcm_s16le", "-ar", str(sample_rate), "-"]
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"load_audio: ffmpeg could not decode {os.fspath(path)!r}: "
                           f"{result.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    return np.frombuffer(result.stdout, np.int16).flatten().astype(np.float32) / 32768.0


def whisper_log_mel(audio, n_mels: int = 80, padding: int = 0, device=None, *, backend: str | None = None):
    """openai-whisper's `log_mel_spectrogram`: `[n_mels, frames]` for `[T]` audio (or a file path,
    decoded by ffmpeg at 16 kHz as whisper does), `[B, n_mels, frames]` for `[B, T]`, with the peak of
    the normalization taken over the whole tensor as whisper does (use
    `log_mel_spectrogram(..., normalize="whisper")` for a per-clip peak)."""
    if isinstance(audio, (str, os.PathLike)):
        audio = load_audio(audio)
    audio = torch.as_tensor(audio)
    if device is not None:
        audio = audio.to(device)
    if not audio.is_floating_point():
        raise TypeError(f"whisper_log_mel: audio must be float samples, got {audio.dtype}")
    if padding > 0:
        audio = torch.nn.functional.pad(audio, (0, padding))
    single = audio.dim() == 1
    features = _whisper_features(audio[None] if single else audio, n_mels, N_FFT, HOP_LENGTH, SAMPLE_RATE,
                                 batch_max=True, backend=backend)
    return features[0] if single else features


class WhisperFeatureExtractor:
    """HF `WhisperFeatureExtractor`'s constructor and call, computed by mmfast.

    Each clip is padded (or truncated) to `chunk_length` seconds, its log-mel taken and normalized
    with its own peak, as HF's numpy path does. `device="cuda"` runs on a GPU.
    """

    model_input_names = ["input_features"]

    def __init__(self, feature_size: int = 80, sampling_rate: int = SAMPLE_RATE, hop_length: int = HOP_LENGTH,
                 chunk_length: int = CHUNK_SECONDS, n_fft: int = N_FFT, padding_value: float = 0.0,
                 return_attention_mask: bool = False, **kwargs):
        self.feature_size, self.sampling_rate, self.hop_length = feature_size, sampling_rate, hop_length
        self.chunk_length, self.n_fft, self.padding_value = chunk_length, n_fft, padding_value
        self.n_samples = chunk_length * sampling_rate
        self.nb_max_frames = self.n_samples // hop_length
        self.return_attention_mask = return_attention_mask

    def __call__(self, raw_speech, truncation: bool = True, pad_to_multiple_of: int | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 padding: str = "max_length", max_length: int | None = None, sampling_rate: int | None = None,
                 do_normalize: bool | None = None, device: str = "cpu", backend: str | None = None, **kwargs):
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"WhisperFeatureExtractor: the model expects sampling_rate={self.sampling_rate}, "
                             f"got {sampling_rate}; resample the audio first")
        clips = self._as_clips(raw_speech)
        target = max_length or self.n_samples
        if padding == "longest":
            target = max(len(clip) for clip in clips)
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        batch = torch.full((len(clips), target), float(self.padding_value), dtype=torch.float32)
        lengths = []
        for row, clip in enumerate(clips):
            if len(clip) > target and not truncation:
                raise ValueError(f"WhisperFeatureExtractor: clip {row} has {len(clip)} samples, more than {target}; "
                                 "pass truncation=True")
            clip = torch.as_tensor(clip[:target], dtype=torch.float32)
            if do_normalize:
                clip = (clip - clip.mean()) / torch.sqrt(clip.var(unbiased=False) + 1e-7)
            batch[row, : clip.shape[0]] = clip
            lengths.append(clip.shape[0])
        features = _whisper_features(batch.to(device), self.feature_size, self.n_fft, self.hop_length,
                                     self.sampling_rate, batch_max=False, backend=backend)
        output = {"input_features": features}
        if return_attention_mask if return_attention_mask is not None else self.return_attention_mask:
            samples = torch.arange(target)[None, :] < torch.tensor(lengths)[:, None]
            output["attention_mask"] = samples[:, :: self.hop_length].to(torch.int32)
        return self._pack(output, return_tensors)

    @staticmethod
    def _as_clips(raw_speech) -> list:
        if isinstance(raw_speech, (list, tuple, np.ndarray, torch.Tensor)) and len(raw_speech) == 0:
            raise ValueError("WhisperFeatureExtractor: raw_speech is empty; pass one clip (a 1-D array or list of "
                             "samples) or a list of clips")
        if isinstance(raw_speech, (np.ndarray, torch.Tensor)) and raw_speech.ndim == 1:
            return [raw_speech]
        if isinstance(raw_speech, (np.ndarray, torch.Tensor)) and raw_speech.ndim == 2:
            return list(raw_speech)
        if isinstance(raw_speech, (list, tuple)) and raw_speech and not np.isscalar(raw_speech[0]):
            return list(raw_speech)
        if isinstance(raw_speech, (list, tuple)):
            return [np.asarray(raw_speech, dtype=np.float32)]
        raise TypeError(f"WhisperFeatureExtractor: raw_speech must be an array, a tensor or a list of them, got "
                        f"{type(raw_speech).__name__}")

    @staticmethod
    def _pack(output: dict, return_tensors: str | None):
        if return_tensors in (None, "np"):
            output = {key: value.cpu().numpy() for key, value in output.items()}
            if return_tensors is None:
                output = {key: list(value) for key, value in output.items()}
        elif return_tensors != "pt":
            raise ValueError(f"WhisperFeatureExtractor: return_tensors must be 'pt', 'np' or None, got "
                             f"{return_tensors!r}")
        try:
            from transformers import BatchFeature
        except ImportError:
            return output
        return BatchFeature(output)


def kaldi_mel_filters(sample_rate: int, n_fft: int, n_mels: int, low_freq: float = 20.0,
                      high_freq: float | None = None) -> torch.Tensor:
    """Kaldi's mel filterbank `[n_fft // 2 + 1, n_mels]` float64: triangles equally spaced on Kaldi's mel
    scale (1127 ln(1 + f / 700)) and triangular in mel (not in Hz), unnormalized; the Nyquist bin is 0."""
    high_freq = sample_rate / 2 if high_freq is None else high_freq
    if not 0 <= low_freq < high_freq <= sample_rate / 2:
        raise ValueError(f"kaldi_fbank: expected 0 <= low_freq < high_freq <= sample_rate / 2, got {low_freq}, "
                         f"{high_freq} at {sample_rate} Hz")
    mel = lambda hertz: 1127.0 * torch.log1p(torch.as_tensor(hertz, dtype=torch.float64) / 700.0)  # noqa: E731
    edges = torch.linspace(float(mel(low_freq)), float(mel(high_freq)), n_mels + 2, dtype=torch.float64)
    bins = mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft)[:, None]
    rising = (bins - edges[:-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[2:] - bins) / (edges[2:] - edges[1:-1])
    return torch.minimum(rising, falling).clamp(min=0)


def kaldi_fbank(waveform: torch.Tensor, *, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                low_freq: float = 20.0, high_freq: float | None = None) -> torch.Tensor:
    """`[B, T]` (or `[T]`) float waveforms -> `[B, frames, num_mel_bins]` (or `[frames, bins]`) Kaldi log-mel
    filterbank features with torchaudio's `kaldi.fbank` defaults as AST uses them (window_type "hanning":
    a symmetric Hann window; dither 0): frames of 25 ms every 10 ms without padding (snip_edges: 1 + (T -
    400) // 160 frames at 16 kHz), each with its mean removed, pre-emphasized (x[i] - 0.97 x[i - 1]),
    windowed and zero-padded to a power of two, power spectrum, Kaldi's mel filters (20 Hz to Nyquist),
    natural log floored at float32's epsilon. The per-frame steps are not what `log_mel_spectrogram`'s fused
    kernel does, so this runs on torch (unfold, rfft, matmul); it gives what HF's `ASTFeatureExtractor`
    gives before its normalization, so converted AST models get their own features from waveforms."""
    single = waveform.dim() == 1
    batch = waveform[None] if single else waveform
    if batch.dim() != 2 or not batch.is_floating_point():
        raise ValueError(f"kaldi_fbank: waveform must be float [B, T] or [T], got {waveform.dtype} "
                         f"{tuple(waveform.shape)}")
    frame_length = round(sample_rate * frame_length_ms / 1000)
    hop = round(sample_rate * frame_shift_ms / 1000)
    if batch.shape[1] < frame_length:
        raise ValueError(f"kaldi_fbank: a waveform of {batch.shape[1]} samples is shorter than one frame "
                         f"({frame_length} samples)")
    n_fft = 1 << (frame_length - 1).bit_length()
    frames = batch.float().unfold(1, frame_length, hop)  # [B, frames, frame_length], a view
    frames = frames - frames.mean(-1, keepdim=True)
    frames = torch.cat([frames[..., :1] * (1 - preemphasis), frames[..., 1:] - preemphasis * frames[..., :-1]], -1)
    window = torch.hann_window(frame_length, periodic=False, dtype=frames.dtype, device=frames.device)
    power = torch.fft.rfft(frames * window, n=n_fft).abs().square()
    filters = kaldi_mel_filters(sample_rate, n_fft, num_mel_bins, low_freq, high_freq).to(power)
    features = (power @ filters).clamp(min=torch.finfo(torch.float32).eps).log()
    return features[0] if single else features


def mel_to_linear(mel: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """`[..., n_mels, frames]` mel power -> `[..., n_fft // 2 + 1, frames]` linear power: the least-squares
    solution of filters^T x = mel (the minimum-norm one where the filterbank leaves it open, e.g. the
    bins below the first filter), clamped at zero (librosa's mel_to_stft solves the non-negative
    problem iteratively instead). filters: `[n_fft // 2 + 1, n_mels]`, as mmfast.ops.log_mel.mel_filters."""
    if filters.dim() != 2 or mel.shape[-2] != filters.shape[1]:
        raise ValueError(f"mel_to_linear: expected filters [n_freqs, {mel.shape[-2]}] for a mel of shape "
                         f"{tuple(mel.shape)}, got {tuple(filters.shape)}")
    inverse = torch.linalg.pinv(filters.T.to(torch.float64)).to(mel.dtype)  # [n_freqs, n_mels]
    return (inverse.to(mel.device) @ mel).clamp(min=0)


def griffin_lim(magnitude: torch.Tensor, *, n_fft: int, hop_length: int, win_length: int | None = None,
                iterations: int = 32, momentum: float = 0.99, length: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A waveform `[..., samples]` whose STFT magnitude (Hann window, centred frames, as
    torch.stft(center=True) and librosa) approaches `magnitude` `[..., n_fft // 2 + 1, frames]`:
    phases from random ones refined `iterations` times by projecting onto consistent STFTs, with
    the fast Griffin-Lim momentum (Perraudin et al. 2013; librosa's default 0.99; 0 is the original).
    Batched over leading dimensions; runs where `magnitude` lives."""
    if magnitude.dim() < 2 or magnitude.shape[-2] != n_fft // 2 + 1:
        raise ValueError(f"griffin_lim: magnitude must be [..., n_fft // 2 + 1 = {n_fft // 2 + 1}, frames], got "
                         f"{tuple(magnitude.shape)}")
    if iterations < 1 or not 0 <= momentum < 1:
        raise ValueError(f"griffin_lim: expected iterations >= 1 and 0 <= momentum < 1, got {iterations}, {momentum}")
    win_length = win_length or n_fft
    leading = magnitude.shape[:-2]
    spectrum = magnitude.reshape(-1, *magnitude.shape[-2:]).to(torch.float32)
    window = torch.hann_window(win_length, device=spectrum.device)
    options = dict(n_fft=n_fft, hop_length=hop_length, win_length=win_length, window=window, center=True)
    phases = torch.rand(spectrum.shape, generator=generator, device="cpu").to(spectrum.device)
    angles = torch.polar(torch.ones_like(spectrum), 2 * torch.pi * phases)
    previous = torch.zeros_like(angles)
    samples = length or (spectrum.shape[-1] - 1) * hop_length
    for _ in range(iterations):
        waveform = torch.istft(spectrum * angles, length=samples, **options)
        rebuilt = torch.stft(waveform, return_complex=True, **options)
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / angles.abs().clamp(min=1e-16)
        previous = rebuilt
    waveform = torch.istft(spectrum * angles, length=samples, **options)
    return waveform.reshape(*leading, waveform.shape[-1])


def spectral_convergence(magnitude: torch.Tensor, waveform: torch.Tensor, *, n_fft: int, hop_length: int,
                         win_length: int | None = None) -> torch.Tensor:
    """|| magnitude - |STFT(waveform)| ||_F / || magnitude ||_F per item: how far a vocoder's waveform is
    from the magnitude it was given (0: exact)."""
    win_length = win_length or n_fft
    window = torch.hann_window(win_length, device=waveform.device)
    rebuilt = torch.stft(waveform.reshape(-1, waveform.shape[-1]), n_fft=n_fft, hop_length=hop_length,
                         win_length=win_length, window=window, center=True, return_complex=True).abs()
    target = magnitude.reshape(rebuilt.shape[0], *magnitude.shape[-2:])
    frames = min(rebuilt.shape[-1], target.shape[-1])
    difference = (target[..., :frames] - rebuilt[..., :frames]).flatten(1).norm(dim=1)
    return (difference / target.flatten(1).norm(dim=1)).reshape(magnitude.shape[:-2])
