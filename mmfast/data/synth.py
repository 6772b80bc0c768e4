"""The bundled image-caption data: procedurally drawn shapes (color, shape, size, position, count, on
varied backgrounds, see shape_sample) and scikit-learn's handwritten digits, written as webdataset
shards (img2dataset layout: `<key>.png`, `<key>.txt`, `<key>.json`), with train and held-out splits.
Nothing is downloaded.

Every sample comes from its own seeded generator, so the same arguments give the same samples.
Zero-shot classes are the color x shape pairs (chance 1 / 36).
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
SIZES = {"small": 0.16, "large": 0.28}
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72), "center": (0.5, 0.5)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of {what}.", "{what}.", "a picture showing {what}.", "an image of {what}.",
             "there is {what}.")


def class_names() -> list[str]:
    """The zero-shot classes: "red circle", "red square", ..."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def class_prompts() -> list[list[str]]:
    """Zero-shot prompts per class of class_names(): pictures show one, two or three of a shape, so
    each class has prompts for each count (scored by their best, see evaluate.zero_shot_accuracy)."""
    templates = ("a photo of {what}.", "a picture showing {what}.", "an image of {what}.")
    return [[template.format(what=f"{word} {color} {_plural(shape, count)}")
             for count, word in ((1, "a"), (2, "two"), (3, "three")) for template in templates]
            for color in COLORS for shape in SHAPES]


def _plural(shape: str, count: int) -> str:
    if count == 1:
        return shape
    return shape + ("es" if shape.endswith("s") else "s")


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """The outline of every shape but the circle, turned by `angle` degrees about its centre."""
    if shape == "square":
        points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "cross":
        bar = 0.35
        points = [(-bar, -1), (bar, -1), (bar, -bar), (1, -bar), (1, bar), (bar, bar), (bar, 1), (-bar, 1),
                  (-bar, bar), (-1, bar), (-1, -bar), (-bar, -bar)]
    elif shape in ("triangle", "diamond", "star"):
        corners = {"triangle": [-90, 30, 150], "diamond": [-90, 0, 90, 180],
                   "star": [-90 + index * 36 for index in range(10)]}[shape]
        points = [((1 if shape != "star" or index % 2 == 0 else 0.45) * math.cos(math.radians(a)),
                   (1 if shape != "star" or index % 2 == 0 else 0.45) * math.sin(math.radians(a)))
                  for index, a in enumerate(corners)]
    else:
        raise ValueError(shape)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, color, angle: float = 0.0,
          outline: int = 0) -> None:
    """A filled shape, or its outline `outline` pixels wide."""
    fill, line = (None, color) if outline else (color, None)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill, outline=line, width=outline)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=fill, outline=line, width=outline)


# The generator draws what a user may show the model, not one look of it: backgrounds of any brightness
# and hue (plain, gradient, noise, stripes or checks), continuous positions and sizes inside each named
# one, a tilt, shades and saturation inside each named color, outlines, neutral clutter, and edges
# anti-aliased by drawing at SUPERSAMPLE times the size and averaging down.
SUPERSAMPLE = 4
TILT = 12  # degrees either way
BACKGROUND_KINDS = ("plain", "gradient", "noise", "stripes", "checks")
BANDS = {"dark": (0, 85), "mid": (85, 170), "light": (170, 256)}  # mean brightness of the background


def band_of(brightness: float) -> str:
    return next(name for name, (low, high) in BANDS.items() if low <= brightness < high)


def _tinted(rng: np.random.Generator, value: float) -> np.ndarray:
    tint = rng.uniform(0.7, 1.3, 3)  # a hue, not only a gray
    return np.clip(tint / tint.mean() * value, 0, 255)


def background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """float [size, size, 3] and its kind; brightness uniform over 0-255."""
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    first = _tinted(rng, rng.uniform(0, 255))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "plain":
        return np.broadcast_to(first, (size, size, 3)).copy(), kind
    if kind == "noise":
        grain = rng.normal(0, rng.uniform(3, 12), (size, size, 1)) + rng.normal(0, 3, (size, size, 3))
        return np.clip(first + grain, 0, 255), kind
    second = np.clip(first + _tinted(rng, rng.uniform(-60, 60) if kind == "gradient" else rng.uniform(-30, 30)),
                     0, 255)  # stripes and checks: a texture, not a second picture
    angle = rng.uniform(0, 2 * math.pi)
    along = np.cos(angle) * xs + np.sin(angle) * ys
    if kind == "gradient":
        ramp = (along - along.min()) / max(along.max() - along.min(), 1e-6)
    elif kind == "stripes":
        ramp = (np.sin(along * 2 * math.pi / rng.uniform(3, 10)) > 0).astype(np.float64)
    else:
        cell = rng.uniform(3, 9)
        ramp = ((xs // cell + ys // cell) % 2).astype(np.float64)
    return first + ramp[..., None] * (second - first), kind


def shade(rng: np.random.Generator, color_name: str) -> tuple[int, int, int]:
    """A shade of the named color: brightness, saturation (mixed toward its gray) and channel jitter."""
    base = np.array(COLORS[color_name], dtype=np.float64)
    base = base * rng.uniform(0.85, 1.12)
    base = base + (base.mean() - base) * rng.uniform(0, 0.25)
    return tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, 3), 0, 255))


def _contrast(color, canvas: np.ndarray) -> float:
    return float(np.abs(np.array(color, dtype=np.float64) - canvas.reshape(-1, 3).mean(0)).max())


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> int:
    """Neutral (gray, near-white, near-black) lines and dots: the caption stays true."""
    pieces = int(rng.integers(1, 5))
    for _ in range(pieces):
        gray = int(rng.choice([rng.integers(0, 50), rng.integers(100, 160), rng.integers(205, 256)]))
        color = tuple(int(np.clip(gray + j, 0, 255)) for j in rng.integers(-6, 7, 3))
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            length, angle = rng.uniform(0.15, 0.4) * size, rng.uniform(0, math.pi)
            draw.line((x, y, x + length * math.cos(angle), y + length * math.sin(angle)), fill=color,
                      width=max(1, int(rng.uniform(0.01, 0.03) * size)))
        else:
            radius = rng.uniform(0.015, 0.04) * size
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    return pieces


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    meta: dict


GEOMETRIES = ("anchored", "continuous")


def shape_sample(rng: np.random.Generator, size: int, geometry: str = "anchored") -> Sample:
    """One picture of 1-3 shapes and its caption. geometry "anchored": the five named positions and two
    sizes exactly, upright and filled (what the bundled CPU model learns shapes from in its 10 minutes);
    "continuous": positions and sizes anywhere inside the named ones, a tilt and outlines (what a model
    must learn to recognize shapes drawn any way; the tiny CPU model does not, see the README).
    Backgrounds, shades, clutter and anti-aliasing are the same for both."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"synth: geometry must be one of {GEOMETRIES}, got {geometry!r}")
    free = geometry == "continuous"
    color_name = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    size_name = rng.choice(list(SIZES))
    position_name = rng.choice(list(POSITIONS))
    count = int(rng.integers(1, 4))
    color = shade(rng, color_name)
    for _ in range(8):  # a background the shape stands out from (a user's drawing does)
        canvas, kind = background(rng, size)
        if _contrast(color, canvas) >= 70:
            break
    big = size * SUPERSAMPLE
    clutter = rng.random() < 0.2
    image = Image.fromarray(np.round(canvas).astype(np.uint8)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    pieces = _clutter(rng, draw, big) if clutter else 0
    # continuous size and position inside the named ones: large ~ 0.22-0.34 of the side, small ~ 0.12-0.19
    scale = SIZES[size_name] * (rng.uniform(0.78, 1.2) if free else 1.0)
    # rows of two or three are smaller, but never below 0.09 of the side: a shape must stay legible
    radius = max(min(scale * big / (1.0 + 0.35 * (count - 1)), big / (2.3 * count)), 0.09 * big)
    cx, cy = ((v + (rng.uniform(-0.08, 0.08) if free else 0.0)) * big for v in POSITIONS[position_name])
    gap = rng.uniform(2.1, 2.6) if free else 2.2
    half_row = (count - 1) * radius * gap / 2 + radius  # the row's half width: shift it inside the image
    cx = float(np.clip(cx, half_row, big - half_row))
    cy = float(np.clip(cy, radius, big - radius))
    # a tilt, not any turn: a square turned 45 degrees is a diamond, and one turned 20 is nearly one
    angle = float(rng.uniform(-TILT, TILT)) if free else 0.0
    # outlines only where they stay visible after the downsampling (about 5 pixels of radius or more)
    visible = free and radius >= 5 * SUPERSAMPLE
    outline = int(max(2, radius * rng.uniform(0.22, 0.35))) if visible and rng.random() < 0.15 else 0
    for index in range(count):  # a row of `count` separate shapes around the position
        offset = (index - (count - 1) / 2) * radius * gap
        _draw(draw, shape, cx + offset, cy + float(rng.normal(0, 0.02 * radius)), radius, color, angle, outline)
    image = image.resize((size, size), Image.BOX)  # anti-aliased edges
    # captions vary in detail as real ones do: size and position each named half the time, a single
    # shape "one" or "a"; so "a red star" is as much a caption as "two small red stars at the center"
    count_word = COUNT_WORDS[count] if count > 1 or rng.random() < 0.5 else "a"
    details = [count_word] + ([size_name] if rng.random() < 0.5 else []) + [color_name, _plural(shape, count)]
    what = " ".join(details) + (f" at the {position_name}" if rng.random() < 0.5 else "")
    caption = rng.choice(TEMPLATES).format(what=what)
    meta = {"kind": "shape", "color": color_name, "shape": shape, "size": size_name, "position": position_name,
            "count": count, "label": class_names().index(f"{color_name} {shape}"), "rgb": list(color),
            "background": band_of(float(canvas.mean())), "background_kind": kind, "outlined": bool(outline),
            "clutter": pieces, "geometry": geometry, "angle": angle, "radius": radius / SUPERSAMPLE,
            "center": [cx / SUPERSAMPLE, cy / SUPERSAMPLE]}
    return Sample(image, caption, meta)


def digit_sample(rng: np.random.Generator, size: int, digits) -> Sample:
    index = int(rng.integers(len(digits.target)))
    color_name = rng.choice(list(COLORS))
    glyph = (digits.images[index] / 16.0)[..., None] * np.array(COLORS[color_name])[None, None, :]
    image = Image.fromarray(glyph.astype(np.uint8)).resize((size, size), Image.NEAREST)
    digit = DIGIT_WORDS[int(digits.target[index])]
    caption = rng.choice(TEMPLATES).format(what=f"a handwritten {color_name} digit {digit}")
    return Sample(image, caption, {"kind": "digit", "color": color_name, "digit": int(digits.target[index])})


def generate(index: int, split: str, seed: int, size: int, digit_fraction: float, digits,
             geometry: str = "anchored") -> Sample:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    if digits is not None and rng.random() < digit_fraction:
        return digit_sample(rng, size, digits)
    return shape_sample(rng, size, geometry)


def _write_shard(job: tuple) -> str:
    """One shard: samples [start, end) of a split (a process-pool job: every sample has its own seed)."""
    import webdataset

    path, split, start, end, seed, size, digit_fraction, geometry = job
    digits = None
    if digit_fraction > 0:
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

        digits = load_digits()
    with webdataset.TarWriter(path) as sink:
        for index in range(start, end):
            sample = generate(index, split, seed, size, digit_fraction, digits, geometry)
            buffer = io.BytesIO()
            sample.image.save(buffer, format="PNG")
            sink.write({"__key__": f"{split}-{index:08d}", "png": buffer.getvalue(),
                        "txt": sample.caption, "json": json.dumps(sample.meta)})
    return path


def write_shards(out_dir: str, *, train: int = 20000, held_out: int = 2000, size: int = 32, seed: int = 0,
                 shard_size: int = 5000, digit_fraction: float = 0.1, geometry: str = "anchored",
                 progress: bool = True, workers: int | None = None) -> dict:
    """Writes `<out_dir>/{train,held_out}-NNNNNN.tar`; returns {split: [paths]}. Shards are drawn in
    `workers` processes (default: one per CPU core); the bytes do not depend on how many."""
    os.makedirs(out_dir, exist_ok=True)
    jobs, written = [], {}
    for split, count in (("train", train), ("held_out", held_out)):
        written[split] = []
        for shard_start in range(0, count, shard_size):
            path = os.path.join(out_dir, f"{split}-{shard_start // shard_size:06d}.tar")
            jobs.append((path, split, shard_start, min(count, shard_start + shard_size), seed, size, digit_fraction,
                         geometry))
            written[split].append(path)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=len(jobs), desc="synth shards", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _write_shard(job)
            bar.update()
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_shard, jobs):
                bar.update()
    bar.close()
    return written
