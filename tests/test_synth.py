"""The bundled generator draws what a user may show the model: deterministic per seed, varied
(backgrounds of every brightness and kind, outlines, clutter, continuous sizes and positions, tilts),
and every picture shows what its caption and metadata say."""
import colorsys
import io

import numpy as np
import pytest

from mmfast.data.synth import BACKGROUND_KINDS, BANDS, COLORS, POSITIONS, SIZES, class_names, shape_sample

SIZE = 64


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(channel / 255 for channel in rgb))[0]


def _samples(count, seed=0, size=SIZE, geometry="continuous"):
    return [shape_sample(np.random.default_rng([seed, 0, index]), size, geometry) for index in range(count)]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("geometry", ["anchored", "continuous"])
def test_same_seed_same_samples_other_seed_others(geometry):
    first, second, other = (_samples(20, seed, geometry=geometry) for seed in (0, 0, 1))
    assert [(_png(a.image), a.caption, a.meta) for a in first] == [(_png(b.image), b.caption, b.meta) for b in second]
    assert [_png(a.image) for a in first] != [_png(c.image) for c in other]


def test_shards_are_the_same_bytes_from_one_process_or_several(tmp_path):
    import tarfile

    from mmfast.data.synth import write_shards

    def members(folder):
        contents = {}
        for path in sorted(folder.glob("*.tar")):
            with tarfile.open(path) as archive:
                contents.update({(path.name, m.name): archive.extractfile(m).read() for m in archive.getmembers()})
        return contents

    options = dict(train=30, held_out=10, shard_size=8, size=24, geometry="continuous", progress=False)
    write_shards(str(tmp_path / "one"), workers=1, **options)
    write_shards(str(tmp_path / "two"), workers=2, **options)
    one, two = members(tmp_path / "one"), members(tmp_path / "two")
    assert len(one) == 40 * 3 and one == two  # png, txt, json of every sample, in 4 + 2 shards


@pytest.fixture(scope="module")
def many():
    return _samples(600)


def test_variety_of_backgrounds_looks_and_geometry(many):
    metas = [sample.meta for sample in many]
    bands = [m["background"] for m in metas]
    for band in BANDS:  # brightness uniform over 0-255: each band about a third
        assert 0.2 < bands.count(band) / len(bands) < 0.47, band
    assert {m["background_kind"] for m in metas} == set(BACKGROUND_KINDS)
    assert 0.04 < np.mean([m["outlined"] for m in metas]) < 0.2
    assert 0.12 < np.mean([m["clutter"] > 0 for m in metas]) < 0.3
    assert {m["label"] for m in metas} == set(range(len(class_names())))
    angles = np.array([m["angle"] for m in metas])
    assert np.abs(angles).max() <= 12 and np.abs(angles).mean() > 3
    single = [m for m in metas if m["count"] == 1]
    for name, nominal in SIZES.items():  # continuous sizes inside each named one, and the two never overlap
        ratios = np.array([m["radius"] / SIZE for m in single if m["size"] == name])
        assert len(np.unique(np.round(ratios, 4))) > 20
        assert ratios.min() >= 0.77 * nominal and ratios.max() <= 1.21 * nominal
    small = max(m["radius"] for m in single if m["size"] == "small")
    assert small < min(m["radius"] for m in single if m["size"] == "large")


def test_pictures_show_their_color_position_and_background(many):
    hues = {name: _hue(rgb) for name, rgb in COLORS.items()}
    checked = 0
    for sample in many:
        meta = sample.meta
        if meta["count"] != 1 or meta["clutter"] or meta["outlined"]:
            continue
        pixels = np.asarray(sample.image, dtype=np.float64)
        ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
        distance = np.hypot(xs - meta["center"][0], ys - meta["center"][1])
        core = pixels[distance < 0.3 * meta["radius"]]  # inside every shape of the vocabulary
        assert len(core) > 0, meta
        shade = core.mean(axis=0)
        nearest = min(hues, key=lambda name: min(abs(_hue(shade) - hues[name]), 1 - abs(_hue(shade) - hues[name])))
        assert nearest == meta["color"], (meta, shade)
        assert meta["color"] in sample.caption and meta["shape"] in sample.caption
        named = np.array(POSITIONS[meta["position"]]) * SIZE
        assert np.abs(np.array(meta["center"]) - named).max() <= 0.15 * SIZE, meta
        far = pixels[distance > 1.6 * meta["radius"]]
        low, high = BANDS[meta["background"]]
        assert low - 30 <= far.mean() <= high + 30, meta
        checked += 1
    assert checked > 100


def test_anchored_geometry_keeps_the_named_positions_and_sizes_exactly():
    for sample in _samples(200, geometry="anchored"):
        meta = sample.meta
        assert meta["angle"] == 0.0 and not meta["outlined"] and meta["geometry"] == "anchored"
        if meta["count"] == 1:
            named = np.array(POSITIONS[meta["position"]]) * SIZE
            radius = max(SIZES[meta["size"]] * SIZE, 0.09 * SIZE)
            assert abs(meta["radius"] - radius) < 1e-6, meta
            assert np.abs(np.array(meta["center"]) - named).max() <= radius + 0.5, meta
    with pytest.raises(ValueError, match="geometry must be one of"):
        shape_sample(np.random.default_rng(0), SIZE, "any")
