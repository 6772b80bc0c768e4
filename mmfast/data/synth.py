"""The bundled image-caption data: procedurally drawn shapes (color, shape, size, position, count)
and scikit-learn's handwritten digits, written as webdataset shards (img2dataset layout:
`<key>.png`, `<key>.txt`, `<key>.json`), with train and held-out splits. Nothing is downloaded.

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


def _polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
    elif shape == "diamond":
        angles = [-90, 0, 90, 180]
    elif shape == "star":
        points = []
        for index in range(10):
            angle = math.radians(-90 + index * 36)
            r = radius if index % 2 == 0 else radius * 0.45
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points
    else:
        raise ValueError(shape)
    return [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a))) for a in angles]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, color) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "cross":
        bar = radius * 0.35
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=color)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=color)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=color)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    meta: dict


def shape_sample(rng: np.random.Generator, size: int) -> Sample:
    color_name = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    size_name = rng.choice(list(SIZES))
    position_name = rng.choice(list(POSITIONS))
    count = int(rng.integers(1, 4))
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    jitter = rng.integers(-20, 21, 3)
    color = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color_name], jitter))
    radius = min(SIZES[size_name] * size / (1.0 + 0.35 * (count - 1)), size / (2.3 * count))
    cx, cy = (v * size for v in POSITIONS[position_name])
    half_row = (count - 1) * radius * 1.1 + radius  # the row's half width: shift it inside the image
    cx = float(np.clip(cx, half_row, size - half_row))
    cy = float(np.clip(cy, radius, size - radius))
    for index in range(count):  # a row of `count` separate shapes around the position
        offset = (index - (count - 1) / 2) * radius * 2.2
        _draw(draw, shape, cx + offset, cy + float(rng.normal(0, 0.5)), radius, color)
    # captions vary in detail as real ones do: size and position each named half the time, a single
    # shape "one" or "a"; so "a red star" is as much a caption as "two small red stars at the center"
    count_word = COUNT_WORDS[count] if count > 1 or rng.random() < 0.5 else "a"
    details = [count_word] + ([size_name] if rng.random() < 0.5 else []) + [color_name, _plural(shape, count)]
    what = " ".join(details) + (f" at the {position_name}" if rng.random() < 0.5 else "")
    caption = rng.choice(TEMPLATES).format(what=what)
    meta = {"kind": "shape", "color": color_name, "shape": shape, "size": size_name, "position": position_name,
            "count": count, "label": class_names().index(f"{color_name} {shape}")}
    return Sample(image, caption, meta)


def digit_sample(rng: np.random.Generator, size: int, digits) -> Sample:
    index = int(rng.integers(len(digits.target)))
    color_name = rng.choice(list(COLORS))
    glyph = (digits.images[index] / 16.0)[..., None] * np.array(COLORS[color_name])[None, None, :]
    image = Image.fromarray(glyph.astype(np.uint8)).resize((size, size), Image.NEAREST)
    digit = DIGIT_WORDS[int(digits.target[index])]
    caption = rng.choice(TEMPLATES).format(what=f"a handwritten {color_name} digit {digit}")
    return Sample(image, caption, {"kind": "digit", "color": color_name, "digit": int(digits.target[index])})


def generate(index: int, split: str, seed: int, size: int, digit_fraction: float, digits) -> Sample:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    if digits is not None and rng.random() < digit_fraction:
        return digit_sample(rng, size, digits)
    return shape_sample(rng, size)


def write_shards(out_dir: str, *, train: int = 20000, held_out: int = 2000, size: int = 32, seed: int = 0,
                 shard_size: int = 5000, digit_fraction: float = 0.1, progress: bool = True) -> dict:
    """Writes `<out_dir>/{train,held_out}-NNNNNN.tar`; returns {split: [paths]}."""
    import webdataset

    digits = None
    if digit_fraction > 0:
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

        digits = load_digits()
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for split, count in (("train", train), ("held_out", held_out)):
        paths = []
        for shard_start in tqdm(range(0, count, shard_size), desc=f"synth {split}", disable=not progress):
            path = os.path.join(out_dir, f"{split}-{shard_start // shard_size:06d}.tar")
            with webdataset.TarWriter(path) as sink:
                for index in range(shard_start, min(count, shard_start + shard_size)):
                    sample = generate(index, split, seed, size, digit_fraction, digits)
                    buffer = io.BytesIO()
                    sample.image.save(buffer, format="PNG")
                    sink.write({"__key__": f"{split}-{index:08d}", "png": buffer.getvalue(),
                                "txt": sample.caption, "json": json.dumps(sample.meta)})
            paths.append(path)
        written[split] = paths
    return written
