"""mmfast data caption: every decodable image described by the LLaVA run (its own caption kept),
uncaptioned images made trainable, --mix written into .txt, a killed run resumed, training choosing
synthetic captions with data.synthetic_captions, bad input named."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmfast
from mmfast.cli import main
from mmfast.data import ShardPairs
from mmfast.data.pairs import tar_samples
from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.train import train
from mmfast.train.pseudo_captions import caption_shards, describe
from mmfast.train.tasks.captions import CaptionChoice
from tests.test_llava_train import STAGES
from tests.test_llava_train import _config as llava_config
from tests.test_train import _config as clip_config

webdataset = pytest.importorskip("webdataset")


def _png(rng) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """A toy LLaVA run, and a shard of 8 captioned pictures, 3 without a caption and a broken one."""
    root = tmp_path_factory.mktemp("pseudo-captions")
    train(llava_config(root, "llava", *STAGES["tune"]), progress=False)
    rng = np.random.default_rng(0)
    with webdataset.TarWriter(str(root / "pairs-000000.tar")) as sink:
        for index in range(12):
            sample = {"__key__": f"{index:03d}", "png": _png(rng) if index != 5 else b"broken"}
            if index not in (2, 7, 9):
                sample["txt"] = f"a picture number {index}"
            sink.write(sample)
    return root


def _samples(path):
    return {key: sample for key, sample in tar_samples(str(path))}


def test_every_image_is_described_beside_its_own_caption(captioner, tmp_path):
    data, out = str(captioner / "pairs-*.tar"), tmp_path / "out"
    report = caption_shards(str(captioner / "llava"), data, str(out), batch_size=4, max_new_tokens=6, progress=False)
    assert report == {**report, "samples": 12, "captioned": 11, "had no caption": 3, "undecodable image": 1,
                      "txt synthetic": 0}
    original, written = _samples(captioner / "pairs-000000.tar"), _samples(out / "pairs-000000.tar")
    assert list(written) == list(original)
    for key, sample in original.items():
        assert {name: written[key][name] for name in sample} == sample  # every file unchanged
    assert "synthetic.txt" not in written["005"]  # the broken image: copied, not described
    # the captions are the model's answers to the prompt, in the same batches (4 decodable images each)
    model, processor = mmfast.load_llava(str(captioner / "llava"))
    keys = [key for key in original if key != "005"]
    images = [Image.open(io.BytesIO(original[key]["png"])) for key in keys]
    expected = [answer for start in range(0, 11, 4) for answer in describe(model, processor, images[start:start + 4],
                                                                            max_new_tokens=6)]
    assert [written[key]["synthetic.txt"].decode() for key in keys] == expected
    # read back: an uncaptioned image trains on its synthetic caption; a captioned one keeps both
    pairs = {meta["key"]: (caption, meta) for _, caption, meta in ShardPairs([str(out / "pairs-000000.tar")])}
    assert len(pairs) == 11 and pairs["002"][0] == written["002"]["synthetic.txt"].decode()
    assert pairs["003"][0] == "a picture number 3"
    assert pairs["003"][1]["synthetic_caption"] == written["003"]["synthetic.txt"].decode()
    # a kill while writing: the shard is redone, the same
    (out / "pairs-000000.tar").rename(out / "pairs-000000.tar.partial")
    (out / "pairs-000000.tar.counts.json").unlink()
    caption_shards(str(captioner / "llava"), data, str(out), batch_size=4, max_new_tokens=6, progress=False)
    assert _samples(out / "pairs-000000.tar") == written


def test_mix_writes_the_choice_into_txt(captioner, tmp_path):
    data = str(captioner / "pairs-*.tar")
    assert main(["data", "caption", "--model", str(captioner / "llava"), "--data", data, "--out",
                 str(tmp_path / "all"), "--mix", "1", "--max-new-tokens", "4"]) == 0
    written = _samples(tmp_path / "all" / "pairs-000000.tar")
    assert written["003"]["txt"] == written["003"]["synthetic.txt"]
    assert written["003"]["original.txt"] == b"a picture number 3" and "original.txt" not in written["002"]
    report = caption_shards(str(captioner / "llava"), data, str(tmp_path / "half"), mix=0.5, max_new_tokens=4,
                            progress=False)
    again = caption_shards(str(captioner / "llava"), data, str(tmp_path / "again"), mix=0.5, max_new_tokens=4,
                           progress=False)
    assert 3 < report["txt synthetic"] < 11 and report["txt synthetic"] == again["txt synthetic"]  # per sample, fixed
    assert json.load(open(tmp_path / "half" / "report.json"))["mix"] == 0.5


def test_training_chooses_synthetic_captions_with_the_set_probability():
    tokenizer = CaptionTokenizer.train(["a red circle", "a blue square", "a green star"], 50, 8)
    captions = ["a red circle"] * 200
    metas = [{"synthetic_caption": "a blue square"} if index % 2 else {} for index in range(200)]
    rows = torch.arange(200)
    own, synthetic = tokenizer(["a red circle"])[0], tokenizer(["a blue square"])[0]
    assert (CaptionChoice(tokenizer, captions, metas, 0.0, 0)(3, rows) == own).all()
    every = CaptionChoice(tokenizer, captions, metas, 1.0, 0)(3, rows)
    assert (every[1::2] == synthetic).all() and (every[::2] == own).all()  # only where there is one
    half = CaptionChoice(tokenizer, captions, metas, 0.5, 0)
    chosen = (half(3, rows)[1::2] == synthetic).all(1).float().mean()
    assert 0.3 < chosen < 0.7 and torch.equal(half(3, rows), half(3, rows))  # a function of (seed, step)
    assert not torch.equal(half(3, rows), half(4, rows))


def test_a_run_trains_on_captioned_shards(captioner, tmp_path):
    out = tmp_path / "captioned"
    caption_shards(str(captioner / "llava"), str(captioner / "pairs-*.tar"), str(out), max_new_tokens=4,
                   progress=False)
    overrides = ["--data.source=shards", f"--data.train={out}/*.tar", f"--data.held_out={out}/*.tar",
                 "--data.synthetic_captions=0.5", "--data.batch_size=4", "--train.steps=2", "--train.eval_every=2"]
    result = train(clip_config(tmp_path, "clip", *overrides), progress=False)
    assert 0 <= result["image_to_text_R@1"] <= 1


def test_bad_input_is_named(captioner, tmp_path):
    with pytest.raises(ValueError, match=r"--mix is a probability in \[0, 1\], got 1.5"):
        caption_shards(str(captioner / "llava"), str(captioner / "pairs-*.tar"), str(tmp_path / "a"), mix=1.5)
    with pytest.raises(ValueError, match="--data matches no shards"):
        caption_shards(str(captioner / "llava"), str(tmp_path / "none-*.tar"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="data.synthetic_captions must be <= 1.0"):
        train(clip_config(tmp_path, "bad", "--data.synthetic_captions=2"), progress=False)
