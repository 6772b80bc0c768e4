"""An out-of-generator evaluation set: the bundled vocabulary (6 colors x 6 shapes) drawn by another
method than `mmfast.data.synth`, with its own randomization.

synth draws with PIL on dark backgrounds at five positions and two sizes. Here each shape is a signed
distance function rasterized with numpy and anti-aliased by pixel coverage, on a background of any
brightness and hue (plain, a gradient or noise) in one of three bands (dark, mid, light), at a
continuous position, size and tilt (up to 12 degrees), in a shade of its named color. A model that learned the
concepts scores here about as on the held-out split; one that learned its generator does not.
Every sample comes from its own seeded generator: the same arguments give the same images.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mmfast.data.synth import COLORS, SHAPES, _polygon, class_names

BACKGROUNDS = {"dark": (0, 70), "mid": (95, 165), "light": (190, 255)}  # mean brightness of the background
BACKGROUND_KINDS = ("plain", "gradient", "noise")


def _box(x, y, half_width, half_height):
    dx, dy = np.abs(x) - half_width, np.abs(y) - half_height
    return np.hypot(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)


def _polygon_distance(x, y, vertices):
    """Signed distance to a simple polygon (negative inside): the nearest edge, the sign by crossings."""
    distance = np.full(x.shape, np.inf)
    inside = np.zeros(x.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        ex, ey = bx - ax, by - ay
        t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey), 0, 1)
        distance = np.minimum(distance, np.hypot(x - ax - t * ex, y - ay - t * ey))
        crosses = ((ay > y) != (by > y)) & (x < ax + (y - ay) * ex / (ey if ey else 1e-12))
        inside ^= crosses
    return np.where(inside, -distance, distance)


def signed_distance(shape: str, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Distance in pixels from (x, y), relative to the shape's centre (already rotated), to the shape's
    outline; negative inside."""
    if shape == "circle":
        return np.hypot(x, y) - radius
    if shape == "square":
        return _box(x, y, radius, radius)
    if shape == "cross":
        bar = radius * 0.35
        return np.minimum(_box(x, y, radius, bar), _box(x, y, bar, radius))
    return _polygon_distance(x, y, _polygon(shape, 0.0, 0.0, radius))


def _background(rng: np.random.Generator, size: int, band: str) -> np.ndarray:
    low, high = BACKGROUNDS[band]

    def color():
        tint = rng.uniform(0.75, 1.25, 3)  # a hue, not only a gray
        value = rng.uniform(low, high)
        return np.clip(tint / tint.mean() * value, 0, 255)

    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    first = color()
    if kind == "plain":
        return np.broadcast_to(first, (size, size, 3)).copy()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(angle) * np.arange(size)[None, :] + np.sin(angle) * np.arange(size)[:, None])
        ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
        return first + ramp[..., None] * (color() - first)
    return np.clip(first + rng.normal(0, 14, (size, size, 1)) + rng.normal(0, 6, (size, size, 3)), 0, 255)


def _shade(rng: np.random.Generator, color_name: str) -> np.ndarray:
    return np.clip(np.array(COLORS[color_name]) * rng.uniform(0.85, 1.1) + rng.integers(-15, 16, 3), 0, 255)


def _paint(background: np.ndarray, shape: str, cx: float, cy: float, radius: float, angle: float,
           shade: np.ndarray) -> np.ndarray:
    """The shape over `background` (float [S, S, 3]), anti-aliased by pixel coverage (float result)."""
    size = background.shape[0]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    x, y = xs - cx, ys - cy
    x, y = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
    coverage = np.clip(0.5 - signed_distance(shape, x, y, radius), 0, 1)[..., None]  # anti-aliased edge
    return background * (1 - coverage) + shade * coverage


def render(rng: np.random.Generator, size: int, color_name: str, shape: str, band: str):
    """One picture as uint8 [size, size, 3] and its metadata."""
    background = _background(rng, size, band)
    radius = rng.uniform(0.14, 0.34) * size
    cx, cy = (rng.uniform(radius + 0.5, size - radius - 0.5) for _ in range(2))
    # a tilt, not any rotation: a square turned 45 degrees is the vocabulary's diamond (and 20 nearly one)
    angle = math.radians(rng.uniform(-12, 12))
    shade = _shade(rng, color_name)
    image = _paint(background, shape, cx, cy, radius, angle, shade)
    meta = {"kind": "shape", "color": color_name, "shape": shape, "background": band,
            "label": class_names().index(f"{color_name} {shape}"), "center": [cx, cy], "radius": radius,
            "angle": angle}
    return np.round(image).astype(np.uint8), meta


def other_renderer_set(count: int = 648, size: int = 32, seed: int = 0):
    """(uint8 images [count, 3, size, size], metas): every color x shape x background band equally
    often (cycled), positions, sizes, rotations and shades drawn per sample."""
    names = list(COLORS)
    images, metas = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, 2, index])
        color_name = names[index % len(names)]
        shape = SHAPES[(index // len(names)) % len(SHAPES)]
        band = list(BACKGROUNDS)[(index // (len(names) * len(SHAPES))) % len(BACKGROUNDS)]
        image, meta = render(rng, size, color_name, shape, band)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        metas.append(meta)
    return torch.stack(images), metas


DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # as mmfast.data.synth_media


def moving_render(rng: np.random.Generator, frames: int, size: int, color_name: str, shape: str, direction: str,
                  band: str):
    """One clip as uint8 [frames, size, size, 3] and its metadata: the shape drawn this way, moving the
    named way with its own motion (eased: slow, fast, slow; a travel of 30-55 % of the frame; a drift of
    up to 2 pixels across), where synth_media moves it at a constant speed."""
    background = _background(rng, size, band)
    radius = rng.uniform(0.13, 0.22) * size
    low, high = radius + 0.5, size - radius - 0.5
    travel = min(rng.uniform(0.3, 0.55) * size, high - low)  # the whole path inside the frame
    dx, dy = DIRECTIONS[direction]
    x0 = rng.uniform(low - min(dx, 0) * travel, high - max(dx, 0) * travel)
    y0 = rng.uniform(low - min(dy, 0) * travel, high - max(dy, 0) * travel)
    drift = rng.uniform(-2, 2)
    angle, shade = math.radians(rng.uniform(-12, 12)), _shade(rng, color_name)
    clip, centers = [], []
    for frame in range(frames):
        progress = 0.5 - 0.5 * math.cos(math.pi * frame / (frames - 1))  # eased
        cx = x0 + dx * travel * progress + abs(dy) * drift * progress
        cy = y0 + dy * travel * progress + abs(dx) * drift * progress
        clip.append(np.round(_paint(background, shape, cx, cy, radius, angle, shade)).astype(np.uint8))
        centers.append([cx, cy])
    meta = {"kind": "video", "color": color_name, "shape": shape, "direction": direction, "background": band,
            "centers": centers, "radius": radius}
    return np.stack(clip), meta


def other_moving_set(count: int = 432, frames: int = 8, size: int = 32, seed: int = 0):
    """(uint8 clips [count, frames, size, size, 3], metas): every color x shape x direction x background
    band equally often (cycled; 432 is each once), everything else drawn per clip."""
    names, directions = list(COLORS), list(DIRECTIONS)
    clips, metas = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, 3, index])
        color_name = names[index % len(names)]
        shape = SHAPES[(index // len(names)) % len(SHAPES)]
        direction = directions[(index // (len(names) * len(SHAPES))) % len(directions)]
        band = list(BACKGROUNDS)[(index // (len(names) * len(SHAPES) * len(directions))) % len(BACKGROUNDS)]
        clip, meta = moving_render(rng, frames, size, color_name, shape, direction, band)
        clips.append(torch.from_numpy(clip))
        metas.append(meta)
    return torch.stack(clips), metas
