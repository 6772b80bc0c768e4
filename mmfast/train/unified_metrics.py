"""Scores of what the unified model generates, measured from the output itself, not from the model:

- captions: the attributes a caption names (color and shape; count and pitch; color, shape and
  direction), read from its words, against the item's own;
- images: the foreground color, from pixels (those far from the border's median color, averaged, named
  by the nearest of mmfast.data.synth.COLORS), and the shape, by a logistic regression on those pixels'
  mask fitted on the bundled training pictures (ShapeClassifier);
- audio: the pitch (the dominant frequency between 100 and 2,000 Hz, inside the requested range widened
  by a fifth on both sides: the generated mel spectrogram has bands some 50 Hz wide at 250 Hz and 150 Hz
  at 1 kHz) and the number of beeps (runs of frames whose energy in that pitch band stays above a third
  of its peak, runs closer than 40 ms joined, shorter than 30 ms dropped).
Each is tested on the bundled data itself, where it must read the truth.
"""
from __future__ import annotations

import numpy as np
import torch

from mmfast.data import synth
from mmfast.data.synth_media import DIRECTIONS, PITCHES

ATTRIBUTES = {"image": ("color", "shape"), "audio": ("count", "pitch"), "video": ("color", "shape", "direction")}
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_WIDENED = {name: (low / 1.2, high * 1.2) for name, (low, high) in PITCHES.items()}


def caption_attributes(caption: str) -> dict:
    """The attributes a caption names: the first color, shape (singular or plural), count word, pitch
    and direction found among its words."""
    found = {}
    for word in caption.lower().replace(".", " ").replace(",", " ").split():
        singular = word[:-2] if word.endswith("ses") or word.endswith("xes") else word.rstrip("s")
        if word in synth.COLORS:
            found.setdefault("color", word)
        elif word in synth.SHAPES or singular in synth.SHAPES:
            found.setdefault("shape", word if word in synth.SHAPES else singular)
        elif word in _COUNTS:
            found.setdefault("count", _COUNTS[word])
        elif word in PITCHES:
            found.setdefault("pitch", word)
        elif word in DIRECTIONS:
            found.setdefault("direction", word)
    return found


def attributes_right(modality: str, caption: str, meta: dict) -> bool:
    """Whether `caption` names every attribute of `modality` as the item's `meta` has it."""
    found = caption_attributes(caption)
    return all(found.get(name) == meta[name] for name in ATTRIBUTES[modality])


def _far_from_border(image: np.ndarray, distance: float) -> np.ndarray:
    """bool [H, W]: the pixels of uint8 `[H, W, 3]` farther (in RGB) than `distance` from the border's
    median color (the foreground of a picture on a plain or textured background)."""
    pixels = image.astype(np.float64)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    return np.linalg.norm(pixels - np.median(border, axis=0), axis=-1) > distance


def foreground_color(image: np.ndarray, distance: float = 60.0) -> str | None:
    """The named color of the foreground pixels of uint8 `[H, W, 3]`; None when there are none."""
    far = _far_from_border(image, distance)
    if not far.any():
        return None
    mean = image[far].astype(np.float64).mean(axis=0)
    names = list(synth.COLORS)
    return names[int(np.argmin([np.linalg.norm(mean - np.array(synth.COLORS[name])) for name in names]))]


class ShapeClassifier:
    """Names the shape of pictures uint8 `[N, 3, H, W]`: a logistic regression on their foreground masks,
    fitted on pictures of the bundled data with their `metas` (it scores generated pictures against the
    requested shape as the bundled generator draws it)."""

    def __init__(self, images: torch.Tensor, metas: list[dict], distance: float = 60.0):
        from mmfast.train.probe import linear_classifier

        self.distance = distance
        labels = torch.tensor([synth.SHAPES.index(meta["shape"]) for meta in metas])
        self.predict = linear_classifier(self.features(images), labels, len(synth.SHAPES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        pictures = images.permute(0, 2, 3, 1).numpy()
        return torch.from_numpy(np.stack([_far_from_border(picture, self.distance) for picture in pictures])
                                .reshape(len(pictures), -1).astype(np.float32))

    def __call__(self, images: torch.Tensor) -> list[str]:
        return [synth.SHAPES[int(index)] for index in self.predict(self.features(images))]


def dominant_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform))
    frequencies = np.fft.rfftfreq(len(waveform), 1.0 / sample_rate)
    band = (frequencies >= 100) & (frequencies <= 2000)
    return float(frequencies[band][np.argmax(spectrum[band])])


def pitch_of(waveform: np.ndarray, sample_rate: int) -> str | None:
    """"low" or "high" when the dominant frequency falls in that (widened) range, else None."""
    frequency = dominant_frequency(waveform, sample_rate)
    return next((name for name, (low, high) in _WIDENED.items() if low <= frequency <= high), None)


def beep_count(waveform: np.ndarray, sample_rate: int) -> int:
    """Beeps: runs of 10 ms frames whose energy around the dominant frequency stays above a third of
    its peak (gaps under 40 ms joined, runs under 30 ms dropped)."""
    frequency = dominant_frequency(waveform, sample_rate)
    hop, size = sample_rate // 100, sample_rate // 25
    window = np.hanning(size)
    frames = np.stack([waveform[start:start + size] * window
                       for start in range(0, len(waveform) - size + 1, hop)])
    spectrum = np.abs(np.fft.rfft(frames, axis=1))
    frequencies = np.fft.rfftfreq(size, 1.0 / sample_rate)
    energy = spectrum[:, np.abs(frequencies - frequency) <= max(60.0, 0.15 * frequency)].sum(axis=1)
    above = energy > energy.max() / 3
    runs, start, gap = [], None, 0
    for index, on in enumerate(above):
        if on:
            if start is None:
                start = index
            elif gap:
                gap = 0
            end = index
        elif start is not None:
            gap += 1
            if gap >= 4:  # 40 ms without energy ends the run
                runs.append(end - start + 1)
                start, gap = None, 0
    if start is not None:
        runs.append(end - start + 1)
    return sum(1 for run in runs if run >= 3)


def audio_right(waveform: torch.Tensor | np.ndarray, sample_rate: int, meta: dict) -> tuple[bool, bool]:
    """(pitch right, count right) of a generated waveform for an item's `meta`."""
    waveform = np.asarray(waveform, dtype=np.float64)
    return pitch_of(waveform, sample_rate) == meta["pitch"], beep_count(waveform, sample_rate) == meta["count"]
