"""The out-of-generator evaluation set: deterministic per seed, balanced over the vocabulary and the
background bands, and its pictures show what their metadata says."""
import colorsys
import math

import numpy as np
import torch

from mmfast.data.other_renderer import BACKGROUNDS, other_renderer_set, signed_distance
from mmfast.data.synth import COLORS, SHAPES, class_names


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(channel / 255 for channel in rgb))[0]


def test_same_seed_same_pictures_and_every_class_in_every_band():
    first, metas = other_renderer_set(216, 32, seed=3)
    second, _ = other_renderer_set(216, 32, seed=3)
    other, _ = other_renderer_set(216, 32, seed=4)
    assert first.shape == (216, 3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first, second) and not torch.equal(first, other)
    for band in BACKGROUNDS:
        assert {m["label"] for m in metas if m["background"] == band} == set(range(36))
    counts = {}
    for meta in metas:
        assert class_names()[meta["label"]] == f"{meta['color']} {meta['shape']}"
        counts[meta["background"]] = counts.get(meta["background"], 0) + 1
    assert counts == {"dark": 72, "mid": 72, "light": 72}  # each class twice in each band


def test_pictures_show_their_color_shape_and_background():
    images, metas = other_renderer_set(648, 64, seed=0)
    hues = {name: _hue(rgb) for name, rgb in COLORS.items()}
    for image, meta in zip(images.permute(0, 2, 3, 1).numpy().astype(float), metas):
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        x, y = xs - meta["center"][0], ys - meta["center"][1]
        angle = meta["angle"]
        x, y = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
        distance = signed_distance(meta["shape"], x, y, meta["radius"])
        inside, outside = distance < -1, distance > 1
        shade = image[inside].mean(axis=0)
        # the named color dominates the shape's pixels: its hue is the nearest of the six
        nearest = min(hues, key=lambda name: min(abs(_hue(shade) - hues[name]), 1 - abs(_hue(shade) - hues[name])))
        assert nearest == meta["color"], (meta, shade)
        low, high = BACKGROUNDS[meta["background"]]
        assert low - 20 <= image[outside].mean() <= high + 20, meta
        # the outline encloses the area its shape has (circle pi r^2, square 4 r^2)
        area = inside.sum() + ((distance >= -1) & (distance <= 1)).sum() / 2
        expected = {"circle": math.pi, "square": 4.0}.get(meta["shape"])
        if expected:
            assert abs(area / (expected * meta["radius"] ** 2) - 1) < 0.12, meta


def test_every_shape_of_the_vocabulary_is_drawn():
    _, metas = other_renderer_set(36, 32)
    assert {m["shape"] for m in metas} == set(SHAPES) and {m["color"] for m in metas} == set(COLORS)


def test_attribute_breakdown_counts_color_and_shape_per_band():
    from mmfast.train.evaluate import attribute_breakdown

    names = class_names()
    metas = [{"color": "red", "shape": "circle", "background": "light"},
             {"color": "red", "shape": "star", "background": "light"},
             {"color": "blue", "shape": "star", "background": "dark"}]
    predicted = torch.tensor([names.index("red circle"), names.index("blue star"), names.index("blue circle")])
    result = attribute_breakdown(predicted, metas, "other_")
    assert result["other_zero_shot_accuracy"] == 1 / 3
    assert result["other_color_accuracy"] == 2 / 3 and result["other_shape_accuracy"] == 2 / 3
    assert result["other_color_accuracy_light"] == 1 / 2 and result["other_shape_accuracy_light"] == 1.0
    assert result["other_zero_shot_accuracy_dark"] == 0.0 and result["other_color_accuracy_dark"] == 1.0


def test_moving_clips_are_deterministic_balanced_and_move_the_named_way():
    from mmfast.data.other_renderer import DIRECTIONS, other_moving_set

    clips, metas = other_moving_set(seed=5)
    again, _ = other_moving_set(seed=5)
    assert clips.shape == (432, 8, 32, 32, 3) and clips.dtype == torch.uint8 and torch.equal(clips, again)
    classes = {(m["color"], m["shape"], m["direction"], m["background"]) for m in metas}
    assert len(classes) == 432  # every color x shape x direction x band once
    for clip, meta in zip(clips[::7], metas[::7]):
        centers = np.array(meta["centers"])
        dx, dy = DIRECTIONS[meta["direction"]]
        moved = centers[-1] - centers[0]
        assert moved @ np.array([dx, dy]) > 0.25 * 32  # along the named way, a quarter of the frame at least
        for frame, (cx, cy) in zip(clip.numpy(), centers):  # the shape's color at its centre in every frame
            pixel = frame[int(cy), int(cx)].astype(float)
            nearest = min(COLORS, key=lambda name: np.abs(np.array(COLORS[name]) - pixel).sum())
            assert nearest == meta["color"]
