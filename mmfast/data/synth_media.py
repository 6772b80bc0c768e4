"""Bundled synthetic audio and video with captions, in the shapes data's vocabulary (deterministic per
seed and index; train and held-out splits draw different clips):

- audio: 1 s at 16 kHz of one, two or three beeps, all low (200-300 Hz) or all high (800-1200 Hz),
  sine or (hard or rounded) square, 0.05-0.3 s long with 2-40 ms attacks and releases, at random
  times and loudness, over white or low-passed noise; captions name the count and pitch and
  half the time the waveform ("two high beeps", "one low square-wave beep");
- video: 8 frames of 32 x 32, a colored shape (mmfast.data.synth's colors and shapes, on its
  backgrounds) moving left, right, up or down by a third to a half of the frame; captions name
  color, shape and direction ("a red circle moving left").

`write_media_shards` writes webdataset shards: `wav` (16-bit PCM) or `npy` (uint8 [T, H, W, 3]),
`txt` and `json` (every attribute) per sample.
"""
from __future__ import annotations

import io
import json
import os
import wave
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmfast.data import synth
from mmfast.data.pairs import tar_samples

SAMPLE_RATE = 16000
PITCHES = {"low": (200.0, 300.0), "high": (800.0, 1200.0)}
WAVES = ("sine", "square")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MODALITIES = ("audio", "video")
AUDIO_FORMAT = 2  # raised whenever the clips change, so old shards are drawn again


@dataclass(frozen=True)
class Clip:
    data: np.ndarray  # audio: float32 [samples] in [-1, 1]; video: uint8 [frames, H, W, 3]
    caption: str
    meta: dict


def beep_clip(rng: np.random.Generator, seconds: float = 1.0, sample_rate: int = SAMPLE_RATE) -> Clip:
    count = int(rng.integers(1, 4))
    pitch = str(rng.choice(list(PITCHES)))
    shape = str(rng.choice(WAVES))
    frequency = float(rng.uniform(*PITCHES[pitch]))
    samples = int(seconds * sample_rate)
    signal = _background(rng, samples, sample_rate)
    # beeps of 0.05-0.3 s at random times, at least 0.08 s apart (so they count as separate beeps)
    durations = rng.uniform(0.05, 0.3 if count < 3 else 0.22, count)
    slack = seconds - durations.sum() - 0.08 * (count + 1)
    gaps = rng.dirichlet(np.ones(count + 1)) * slack + 0.08
    starts, time = [], gaps[0]
    for index in range(count):
        starts.append(float(time))
        time += durations[index] + gaps[index + 1]
    for start, duration in zip(starts, durations):
        begin, length = int(start * sample_rate), int(duration * sample_rate)
        phase = 2 * np.pi * frequency * np.arange(length) / sample_rate
        if shape == "sine":
            tone = np.sin(phase)
        else:  # a hard or a slightly rounded square, its power about a sine's
            tone = np.tanh(rng.uniform(3, 30) * np.sin(phase)) * 0.7
        # linear attack and release of 2-40 ms each
        attack, release = rng.uniform(0.002, 0.04, 2) * sample_rate
        ramp = np.arange(length)
        fade = np.clip(np.minimum(ramp / attack, (length - 1 - ramp) / release), 0, 1)
        signal[begin:begin + length] += rng.uniform(0.3, 0.85) * tone * fade
    words = [synth.COUNT_WORDS[count] if count > 1 or rng.random() < 0.5 else "a", pitch]
    if rng.random() < 0.5:
        words.append(f"{shape}-wave")
    words.append("beep" if count == 1 else "beeps")
    meta = {"kind": "audio", "count": count, "pitch": pitch, "frequency": frequency, "wave": shape,
            "starts": starts, "durations": [float(d) for d in durations], "sample_rate": sample_rate}
    return Clip(np.clip(signal, -1, 1).astype(np.float32), " ".join(words), meta)


def _background(rng: np.random.Generator, samples: int, sample_rate: int) -> np.ndarray:
    """What the beeps sound over: white noise, or noise low-passed by a one-pole filter (a rumble), at
    a random level."""
    noise = rng.normal(0, 1, samples)
    if rng.random() < 0.5:
        from scipy.signal import lfilter

        pole = np.exp(-2 * np.pi * rng.uniform(30, 400) / sample_rate)
        noise = lfilter([1 - pole], [1, -pole], noise)
        noise /= noise.std() + 1e-12
    return noise * rng.uniform(0.003, 0.03)


def other_beep_clip(rng: np.random.Generator, seconds: float = 1.0, sample_rate: int = SAMPLE_RATE) -> Clip:
    """Beeps made another way, for evaluation only: squares summed from their odd harmonics (band-limited)
    rather than clipped sines, raised-cosine envelopes rather than linear fades, beeps of 0.06-0.3 s
    placed by rejection rather than spread gaps, and a 50-60 Hz hum with brown noise under them. Same
    vocabulary: count, pitch, waveform."""
    count = int(rng.integers(1, 4))
    pitch = str(rng.choice(list(PITCHES)))
    shape = str(rng.choice(WAVES))
    frequency = float(rng.uniform(*PITCHES[pitch]))
    samples = int(seconds * sample_rate)
    time = np.arange(samples) / sample_rate
    brown = np.cumsum(rng.normal(0, 1, samples))
    brown = (brown - np.convolve(brown, np.ones(401) / 401, mode="same")) * rng.uniform(0.0005, 0.002)
    signal = brown + rng.uniform(0.005, 0.03) * np.sin(2 * np.pi * rng.uniform(50, 60) * time)
    spans: list[tuple[float, float]] = []
    while len(spans) < count:  # beeps at least 0.1 s apart, placed by rejection (from scratch when stuck)
        spans, tries = [], 0
        while len(spans) < count and tries < 200:
            tries += 1
            duration = float(rng.uniform(0.06, 0.3 if count < 3 else 0.2))
            start = float(rng.uniform(0.05, seconds - duration - 0.05))
            if all(start > end + 0.1 or start + duration < begin - 0.1 for begin, end in spans):
                spans.append((start, start + duration))
    spans.sort()
    for begin, end in spans:
        inside = (time >= begin) & (time < end)
        local = time[inside] - begin
        harmonics = [1] if shape == "sine" else [k for k in range(1, 40, 2) if k * frequency < sample_rate / 2]
        tone = sum(np.sin(2 * np.pi * k * frequency * local) / k for k in harmonics)
        tone = tone / np.abs(tone).max()
        envelope = np.sin(np.pi * local / (end - begin)) ** 0.5  # a raised, rounded envelope
        signal[inside] += rng.uniform(0.35, 0.8) * tone * envelope
    meta = {"kind": "audio", "count": count, "pitch": pitch, "frequency": frequency, "wave": shape,
            "starts": [begin for begin, _ in spans], "durations": [end - begin for begin, end in spans],
            "sample_rate": sample_rate, "generator": "other"}
    noun = "beep" if count == 1 else "beeps"
    return Clip(np.clip(signal, -1, 1).astype(np.float32), f"{synth.COUNT_WORDS[count]} {pitch} {noun}", meta)


def other_beeps(count: int = 300, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """The evaluation set of beeps made another way: float32 [count, samples] and their metadata."""
    clips = [other_beep_clip(np.random.default_rng([seed, 7, index])) for index in range(count)]
    return np.stack([clip.data for clip in clips]), [clip.meta for clip in clips]


def moving_clip(rng: np.random.Generator, frames: int = 8, size: int = 32) -> Clip:
    color_name = str(rng.choice(list(synth.COLORS)))
    shape = str(rng.choice(synth.SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))
    color = synth.shade(rng, color_name)
    for _ in range(8):  # a background the shape stands out from
        canvas, kind = synth.background(rng, size)
        if synth._contrast(color, canvas) >= 70:
            break
    big = size * synth.SUPERSAMPLE
    radius = rng.uniform(0.12, 0.2) * big
    travel = rng.uniform(0.33, 0.5) * big
    dx, dy = DIRECTIONS[direction]
    # a start from which the whole path stays inside the frame
    low, high = radius, big - radius
    x0 = rng.uniform(low - min(dx, 0) * travel, high - max(dx, 0) * travel)
    y0 = rng.uniform(low - min(dy, 0) * travel, high - max(dy, 0) * travel)
    background = Image.fromarray(np.round(canvas).astype(np.uint8)).resize((big, big), Image.NEAREST)
    video, centers = [], []
    for frame in range(frames):
        step = frame / (frames - 1)
        cx, cy = x0 + dx * travel * step, y0 + dy * travel * step
        image = background.copy()
        synth._draw(ImageDraw.Draw(image), shape, cx, cy, radius, color)
        video.append(np.asarray(image.resize((size, size), Image.BOX)))
        centers.append([cx / synth.SUPERSAMPLE, cy / synth.SUPERSAMPLE])
    article = "an" if color_name[0] in "aeiou" else "a"
    meta = {"kind": "video", "color": color_name, "shape": shape, "direction": direction, "centers": centers,
            "radius": radius / synth.SUPERSAMPLE, "background": synth.band_of(float(canvas.mean())),
            "background_kind": kind}
    return Clip(np.stack(video), f"{article} {color_name} {shape} moving {direction}", meta)


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def reversed_clip_caption(caption: str, direction: str) -> str:
    """The caption of a moving clip played backwards: its direction word turned around. Backwards, a clip
    is one of the opposite direction from the same distribution (its start is drawn so that the whole path
    stays inside the frame, either way), so reversal is an exact augmentation of the motion's sign."""
    words = caption.split(" ")
    if words.count(direction) != 1:
        raise ValueError(f"reversed_clip_caption: expected the direction {direction!r} once in the caption, got "
                         f"{caption!r}")
    return " ".join(OPPOSITE[direction] if word == direction else word for word in words)


def media_clip(modality: str, index: int, split: str, seed: int) -> Clip:
    if modality not in MODALITIES:
        raise ValueError(f"synth media: modality must be one of {MODALITIES}, got {modality!r}")
    rng = np.random.default_rng([seed, 4 + MODALITIES.index(modality), 0 if split == "train" else 1, index])
    return beep_clip(rng) if modality == "audio" else moving_clip(rng)


def wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes((np.clip(waveform, -1, 1) * 32767).round().astype("<i2").tobytes())
    return buffer.getvalue()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """float32 [samples] in [-1, 1] and the sample rate of 16-bit mono PCM WAV bytes."""
    with wave.open(io.BytesIO(data), "rb") as handle:
        if handle.getsampwidth() != 2 or handle.getnchannels() != 1:
            raise ValueError(f"read_wav: expected 16-bit mono PCM, got {8 * handle.getsampwidth()}-bit with "
                             f"{handle.getnchannels()} channels")
        samples = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
        return samples.astype(np.float32) / 32767, handle.getframerate()


def write_media_shards(out_dir: str, modality: str, *, train: int = 4000, held_out: int = 400, seed: int = 0,
                       shard_size: int = 2000, progress: bool = True) -> dict:
    """Writes `<out_dir>/{train,held_out}-NNNNNN.tar` of `modality` clips; returns {split: [paths]}."""
    import webdataset

    if modality not in MODALITIES:
        raise ValueError(f"synth media: modality must be one of {MODALITIES}, got {modality!r}")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    bar = tqdm(total=train + held_out, desc=f"synth {modality}", disable=not progress)
    for split, count in (("train", train), ("held_out", held_out)):
        written[split] = []
        for shard_start in range(0, count, shard_size):
            path = os.path.join(out_dir, f"{split}-{shard_start // shard_size:06d}.tar")
            with webdataset.TarWriter(path) as sink:
                for index in range(shard_start, min(count, shard_start + shard_size)):
                    clip = media_clip(modality, index, split, seed)
                    if modality == "audio":
                        payload = {"wav": wav_bytes(clip.data, clip.meta["sample_rate"])}
                    else:
                        buffer = io.BytesIO()
                        np.save(buffer, clip.data)
                        payload = {"npy": buffer.getvalue()}
                    sink.write({"__key__": f"{split}-{index:08d}", **payload, "txt": clip.caption,
                                "json": json.dumps(clip.meta)})
                    bar.update()
            written[split].append(path)
    bar.close()
    return written


def ensure_media_shards(data, modality: str, version: int, progress: bool = True) -> None:
    """Writes the bundled `modality` clips (data.train_samples and data.held_out_samples, data.seed) into
    data.synth_dir unless the same ones (format `version`) are there; call on one rank."""
    marker = os.path.join(data.synth_dir, "synth.json")
    wanted = {"modality": modality, "format": version, "train": data.train_samples,
              "held_out": data.held_out_samples, "seed": data.seed}
    if os.path.exists(marker) and json.load(open(marker)) == wanted:
        return
    write_media_shards(data.synth_dir, modality, train=data.train_samples, held_out=data.held_out_samples,
                       seed=data.seed, progress=progress)
    with open(marker, "w") as handle:
        json.dump(wanted, handle)


def load_media_split(folder: str, split: str) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A split of bundled clips written by write_media_shards: float32 waveforms [N, samples] (`wav`) or
    uint8 frames [N, T, H, W, 3] (`npy`), captions and metadata."""
    clips, captions, metas = [], [], []
    for name in sorted(os.listdir(folder)):
        if name.startswith(split + "-") and name.endswith(".tar"):
            for _, sample in tar_samples(os.path.join(folder, name)):
                clips.append(read_wav(sample["wav"])[0] if "wav" in sample
                             else np.load(io.BytesIO(sample["npy"]), allow_pickle=False))
                captions.append(sample["txt"].decode("utf-8"))
                metas.append(json.loads(sample["json"]))
    if not clips:
        raise FileNotFoundError(f"synth media: no {split} shards in {folder}")
    return torch.from_numpy(np.stack(clips)), captions, metas
