"""mmfast data dedup: exact copies by pixels, near copies by image-embedding cosine (faiss and the
blocked product agree with the whole matrix), copies of an evaluation split, the first of a group
kept, a killed run resumed from its index, bad input named."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmfast
from mmfast.cli import main
from mmfast.data.pairs import tar_samples
from mmfast.train import dedup as dedup_module
from mmfast.train.dedup import best_matches, dedup

webdataset = pytest.importorskip("webdataset")


def _reference(queries, references, threshold, earlier_only):
    cosines = queries @ references.T
    if earlier_only:
        cosines = cosines.masked_fill(torch.ones_like(cosines, dtype=torch.bool).triu(), float("-inf"))
    value, index = cosines.max(1)
    return torch.where(value >= threshold, index, -1)


@pytest.mark.parametrize("use_faiss", [False, True])
def test_best_matches_are_the_whole_matrix_ones(monkeypatch, use_faiss):
    if use_faiss:
        pytest.importorskip("faiss")
    monkeypatch.setattr(dedup_module, "BLOCK", 64)  # several blocks of rows and of columns
    generator = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(300, 8, generator=generator), dim=1)
    items[200:210] = torch.nn.functional.normalize(items[10:20] + 0.02 * torch.randn(10, 8, generator=generator), dim=1)
    others = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    for threshold in (0.9, 0.99):
        index, cosine = best_matches(items, items, threshold, earlier_only=True, use_faiss=use_faiss)
        assert torch.equal(index, _reference(items, items, threshold, True))
        assert (index[200:210] == torch.arange(10, 20)).all()
        found = index >= 0
        assert torch.allclose(cosine[found], (items[found] * items[index[found]]).sum(1), atol=1e-5)
        index, _ = best_matches(items, others, threshold, use_faiss=use_faiss)
        assert torch.equal(index, _reference(items, others, threshold, False))


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _nudged(image: Image.Image) -> Image.Image:
    pixels = np.array(image)
    pixels[0, 0] = (pixels[0, 0].astype(int) + 1) % 256  # one pixel, one level: not the same pixels
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def shards(trained_clip, tmp_path_factory):
    """data-000000.tar: 40 pictures of the bundled held-out split, then a re-encoded copy of picture 3
    (other bytes, same pixels), a one-pixel copy of picture 5, a broken image and a picture without a
    caption; eval-000000.tar: a copy of picture 7, a one-pixel copy of 9 and 10 other pictures."""
    root = tmp_path_factory.mktemp("dedup")
    held_out = sorted((trained_clip / "synth").glob("held_out-*.tar"))[0]
    pictures = [(key, Image.open(io.BytesIO(sample["png"])).convert("RGB"), sample["txt"].decode())
                for key, sample in tar_samples(str(held_out))]
    with webdataset.TarWriter(str(root / "data-000000.tar")) as sink:
        for key, image, caption in pictures[:40]:
            sink.write({"__key__": key, "png": _png(image), "txt": caption})
        sink.write({"__key__": "copy-of-3", "png": _png(pictures[3][1], compress_level=0), "txt": "again"})
        sink.write({"__key__": "near-5", "png": _png(_nudged(pictures[5][1])), "txt": "almost"})
        sink.write({"__key__": "broken", "png": b"not a png", "txt": "broken"})
        sink.write({"__key__": "uncaptioned", "png": _png(pictures[41][1])})
    with webdataset.TarWriter(str(root / "eval-000000.tar")) as sink:
        sink.write({"__key__": "e7", "png": _png(pictures[7][1]), "txt": "x"})
        sink.write({"__key__": "e9", "png": _png(_nudged(pictures[9][1])), "txt": "x"})
        for key, image, caption in pictures[50:60]:
            sink.write({"__key__": key, "png": _png(image), "txt": caption})
    return root, [key for key, _, _ in pictures]


def _kept(folder):
    return [key for shard in sorted(folder.glob("*.tar")) for key, _ in tar_samples(str(shard))]


def _near_threshold(trained_clip, shards):
    """A cosine between the planted one-pixel copies and the closest distinct pictures (asserted apart)."""
    root, keys = shards
    model, preprocess, _ = mmfast.load_clip(str(trained_clip / "run"))
    images = [Image.open(io.BytesIO(sample["png"])) for _, sample in tar_samples(str(root / "data-000000.tar"))
              if b"PNG" in sample["png"][:8]]
    with torch.no_grad():
        embedded = model.encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
    cosines = embedded[:40] @ embedded[:40].T
    distinct = cosines.masked_fill(torch.eye(40, dtype=torch.bool), -1).max().item()
    planted = (embedded[41] @ embedded[5]).item()
    assert planted > distinct  # one pixel moves the embedding less than any other picture is away
    return (planted + distinct) / 2


def test_exact_near_and_evaluation_copies_are_removed_and_the_first_kept(trained_clip, shards, tmp_path):
    root, keys = shards
    data = str(root / "data-*.tar")
    report = dedup(data, str(tmp_path / "exact"), exact=True, progress=False)
    assert report["pairs"] == 44 and report["kept"] == 42
    assert report["removed_by_rule"] == {"exact duplicate": 1, "no decodable image": 1}
    assert "copy-of-3" not in _kept(tmp_path / "exact") and keys[3] in _kept(tmp_path / "exact")
    assert "uncaptioned" in _kept(tmp_path / "exact")  # images need no caption here
    assert report["skipped"] == {"corrupt image (UnidentifiedImageError)": 1}
    removed = [json.loads(line) for line in open(tmp_path / "exact" / "removed.jsonl")]
    assert removed == [{"id": "data-000000.tar/copy-of-3", "rule": "exact duplicate", "of": f"data-000000.tar/{keys[3]}"}]

    threshold = _near_threshold(trained_clip, shards)
    report = dedup(data, str(tmp_path / "near"), exact=True, near=threshold, model=str(trained_clip / "run"),
                   against=str(root / "eval-*.tar"), progress=False)
    assert report["removed_by_rule"] == {"exact duplicate": 1, "near duplicate": 1, "copy of evaluation": 1,
                                         "close to evaluation": 1, "no decodable image": 1}
    kept = _kept(tmp_path / "near")
    assert len(kept) == 39 and not {"copy-of-3", "near-5", keys[7], keys[9]} & set(kept)
    assert {keys[3], keys[5]} <= set(kept)
    removed = {row["id"].split("/")[1]: row for row in map(json.loads, open(tmp_path / "near" / "removed.jsonl"))}
    assert removed["near-5"]["of"] == f"data-000000.tar/{keys[5]}" and removed["near-5"]["cosine"] >= threshold
    assert removed[keys[7]] == {"id": f"data-000000.tar/{keys[7]}", "rule": "copy of evaluation",
                                "of": "eval-000000.tar/e7"}
    assert removed[keys[9]]["rule"] == "close to evaluation"
    # faiss and the blocked product remove the same items
    if dedup_module._faiss() is not None:
        blocked = dedup(data, str(tmp_path / "blocked"), exact=True, near=threshold, model=str(trained_clip / "run"),
                        against=str(root / "eval-*.tar"), use_faiss=False, progress=False)
        assert blocked["search"] == "blocked product" and report["search"] == "faiss"
        assert _kept(tmp_path / "blocked") == kept


def test_a_killed_run_resumes_from_its_index(trained_clip, shards, tmp_path, monkeypatch):
    root, _ = shards
    data, out = str(root / "data-*.tar"), tmp_path / "out"
    first = dedup(data, str(out), exact=True, near=0.9999, model=str(trained_clip / "run"), progress=False)
    (out / "report.json").unlink()
    (out / "data-000000.tar").rename(out / "data-000000.tar.partial")  # killed while writing
    monkeypatch.setattr(dedup_module, "_index_shard", lambda *a, **k: pytest.fail("the index was made again"))
    again = dedup(data, str(out), exact=True, near=0.9999, model=str(trained_clip / "run"), progress=False)
    assert again["kept"] == first["kept"] and _kept(out) and not list(out.glob("*.partial"))
    with pytest.raises(ValueError, match="holds the index of a run with"):
        dedup(data, str(out), exact=True, progress=False)  # no model: another index


def test_bad_input_is_named(trained_clip, shards, tmp_path):
    root, _ = shards
    data = str(root / "data-*.tar")
    with pytest.raises(ValueError, match="give --exact, --near THRESHOLD, --against SHARDS"):
        dedup(data, str(tmp_path / "a"), exact=False)
    with pytest.raises(ValueError, match="give --model"):
        dedup(data, str(tmp_path / "b"), near=0.9)
    with pytest.raises(ValueError, match=r"--near is a cosine in \[-1, 1\], got 3"):
        dedup(data, str(tmp_path / "c"), near=3, model=str(trained_clip / "run"))
    with pytest.raises(ValueError, match="--data matches no shards"):
        dedup(str(tmp_path / "none-*.tar"), str(tmp_path / "d"))
    with pytest.raises(ValueError, match="--against matches no shards"):
        dedup(data, str(tmp_path / "e"), against=str(tmp_path / "none-*.tar"), progress=False)
    assert main(["data", "dedup", "--data", data, "--out", str(tmp_path / "cli"), "--exact"]) == 0
    assert json.load(open(tmp_path / "cli" / "report.json"))["kept"] == 42
