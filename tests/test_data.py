"""The bundled synthetic data (determinism, classes, shards) and the pair readers (corrupt and
missing images skipped and counted)."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.data import FilePairs, ShardPairs, class_names, write_shards

webdataset = pytest.importorskip("webdataset")


def _decoded(paths):
    return [(np.asarray(image).copy(), caption, meta) for image, caption, meta in ShardPairs(paths)]


def test_synth_is_deterministic_and_labels_its_classes(tmp_path):
    first = write_shards(str(tmp_path / "a"), train=40, held_out=10, shard_size=16, progress=False)
    second = write_shards(str(tmp_path / "b"), train=40, held_out=10, shard_size=16, progress=False)
    other = write_shards(str(tmp_path / "c"), train=40, held_out=10, shard_size=16, seed=1, progress=False)
    assert [os.path.basename(p) for p in first["train"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    a, b, c = _decoded(first["train"]), _decoded(second["train"]), _decoded(other["train"])
    assert len(a) == 40
    for (image_a, caption_a, meta_a), (image_b, caption_b, meta_b) in zip(a, b):
        assert np.array_equal(image_a, image_b) and caption_a == caption_b and meta_a == meta_b
    assert any(caption_a != caption_c for (_, caption_a, _), (_, caption_c, _) in zip(a, c))
    held_out = _decoded(first["held_out"])
    assert len(held_out) == 10 and all(image.shape == (32, 32, 3) for image, _, _ in held_out)
    assert len(class_names()) == 36
    for _, caption, meta in a:
        if meta["kind"] == "shape":
            assert meta["color"] in caption and class_names()[meta["label"]] == f"{meta['color']} {meta['shape']}"
        else:
            assert "digit" in caption


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    path = str(tmp_path / "mixed.tar")
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good, format="PNG")
    with webdataset.TarWriter(path) as sink:
        sink.write({"__key__": "a", "png": good.getvalue(), "txt": "fine"})
        sink.write({"__key__": "b", "png": good.getvalue()[:20], "txt": "truncated"})
        sink.write({"__key__": "c", "txt": "no image"})
        sink.write({"__key__": "d", "png": good.getvalue(), "txt": "fine too", "json": json.dumps({"k": 1})})
    dataset = ShardPairs(path)
    captions = [caption for _, caption, _ in dataset]
    assert captions == ["fine", "fine too"]
    assert dataset.skipped == 2 and any("corrupt" in reason for reason in dataset.problems)


def test_several_shards_are_read_in_parallel_as_in_one_process(tmp_path):
    """A split of several shards is read one process per core: the same pictures, captions and metadata
    in the same order as read one after another, with every shard's skipped samples counted."""
    from mmfast.data.splits import _read_pairs

    written = write_shards(str(tmp_path), train=30, held_out=1, size=16, seed=3, shard_size=10, digit_fraction=0.0,
                           progress=False)["train"]
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good, format="PNG")
    with webdataset.TarWriter(str(tmp_path / "train-000003.tar")) as sink:
        sink.write({"__key__": "a", "png": good.getvalue(), "txt": "fine"})
        sink.write({"__key__": "b", "png": good.getvalue()[:20], "txt": "truncated"})
    shards = [*written, str(tmp_path / "train-000003.tar")]
    reader = ShardPairs(shards)
    images, captions, metas = _read_pairs(reader, 16, "train", "the train split", quiet=True)
    one_by_one = [_read_pairs(ShardPairs([shard]), 16, "train", "the train split", quiet=True) for shard in shards]
    assert torch.equal(images, torch.cat([part[0] for part in one_by_one])) and images.shape == (31, 3, 16, 16)
    assert captions == [c for part in one_by_one for c in part[1]] and captions[-1] == "fine"
    assert metas == [m for part in one_by_one for m in part[2]]
    assert reader.skipped == 1 and any("corrupt" in reason for reason in reader.problems)


def test_file_pairs_skip_missing_and_corrupt(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\nok.png\ta black square\nmissing.png\tgone\nbad.png\tbroken\n")
    dataset = FilePairs(str(tmp_path / "pairs.tsv"))
    assert len(dataset) == 3
    assert [caption for _, caption in dataset.valid()] == ["a black square"]
    assert dataset.problems == {"missing file": 1, "corrupt image (UnidentifiedImageError)": 1}
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "ok.png", "caption": "x"}) + "\n")
    assert [c for _, c in FilePairs(str(tmp_path / "pairs.jsonl"), "image", "caption").valid()] == ["x"]
    with pytest.raises(ValueError, match="needs columns 'filepath' and 'title'"):
        FilePairs(str(tmp_path / "pairs.jsonl"))


def test_cli_writes_the_synthetic_shards(tmp_path, capsys):
    from mmfast.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--train", "12", "--held-out", "4", "--shard-size", "8"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["held_out-000000.tar", "train-000000.tar", "train-000001.tar"]
    assert "train: 2 shard(s)" in capsys.readouterr().out


def test_tokenizer_is_one_file_and_keeps_its_context_length(tmp_path):
    from mmfast.data.tokenizer import CaptionTokenizer

    tokenizer = CaptionTokenizer.train(["a red circle.", "two blue stars at the top left."] * 20, 60, 12)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert os.listdir(tmp_path) == ["tokenizer.json"]
    loaded = CaptionTokenizer.load(str(tmp_path / "tokenizer.json"))
    assert loaded.context_length == 12
    assert torch.equal(loaded(["a red circle."]), tokenizer(["a red circle."]))
    assert CaptionTokenizer.load(str(tmp_path / "tokenizer.json"), 20)(["a red circle."]).shape == (1, 20)
