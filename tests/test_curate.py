"""mmfast data score / filter: each pair's cosine under a trained CLIP, resumed after a kill without
repeats; the kept shards by threshold, top fraction and basic rules, with what each rule removed;
bad input named."""
import json

import pytest
import torch

import mmfast
from mmfast.cli import main
from mmfast.data.pairs import tar_samples
from mmfast.train.curate import filter_shards, score

pytest.importorskip("webdataset")


@pytest.fixture
def trained(trained_clip):
    return trained_clip


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_scores_are_the_models_cosines_and_a_killed_run_resumes(trained, tmp_path):
    data = str(trained / "synth" / "held_out-*.tar")
    out = tmp_path / "scores.jsonl"
    report = score(str(trained / "run"), data, str(out), batch_size=16, progress=False)
    rows = _rows(out)
    assert report["scored"] == len(rows) == 64 and len({row["id"] for row in rows}) == 64
    assert json.load(open(f"{out}.report.json"))["scored"] == 64
    # the first pair's score is the model's cosine of its image and caption
    model, preprocess, tokenizer = mmfast.load_clip(str(trained / "run"))
    shard = sorted((trained / "synth").glob("held_out-*.tar"))[0]
    key, sample = next(tar_samples(str(shard)))
    from PIL import Image
    import io

    image = preprocess(Image.open(io.BytesIO(sample["png"])))[None]
    with torch.no_grad():
        expected = (model.encode_image(image, normalize=True) * model.encode_text(
            tokenizer([sample["txt"].decode()]), normalize=True)).sum().item()
    assert rows[0]["id"] == f"{shard.name}/{key}" and rows[0]["score"] == pytest.approx(expected, abs=1e-5)
    # a kill: 10 complete lines and a cut one; the rerun scores the rest, once each
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:10]) + text[10][:15])
    score(str(trained / "run"), data, str(out), batch_size=16, progress=False)
    again = _rows(out)
    assert len(again) == 64 and {r["id"]: r["score"] for r in again} == pytest.approx({r["id"]: r["score"] for r in rows})


def test_filter_keeps_the_best_pairs_and_counts_each_rule(trained, tmp_path):
    data = str(trained / "synth" / "held_out-*.tar")
    scores = tmp_path / "scores.jsonl"
    assert main(["data", "score", "--model", str(trained / "run"), "--data", data, "--out", str(scores)]) == 0
    values = sorted((row["score"] for row in _rows(scores)), reverse=True)
    report = filter_shards(str(scores), data, str(tmp_path / "half"), top_fraction=0.5, progress=False)
    assert report["kept"] == 32 and report["removed_by_rule"] == {"clip score": 32}
    assert report["threshold"] == values[31]
    kept = [key for shard in sorted((tmp_path / "half").glob("*.tar")) for key, sample in tar_samples(str(shard))]
    best = {row["id"].split("/", 1)[1] for row in _rows(scores) if row["score"] >= values[31]}
    assert set(kept) == best
    _, sample = next(tar_samples(str(sorted((tmp_path / "half").glob("*.tar"))[0])))
    assert set(sample) == {"png", "txt", "json"}  # every file of a kept sample, unchanged
    # basic rules: each counted, a pair may fail several; intersection with the threshold
    report = filter_shards(str(scores), data, str(tmp_path / "strict"), threshold=values[-1], min_words=5,
                           progress=False)
    assert 0 < report["removed_by_rule"]["caption words"] == 64 - report["kept"]
    # keeping nothing is an error naming what each rule removed, and leaves no shards behind
    with pytest.raises(ValueError, match=r"no pair of the 64 in 1 shard\(s\) is kept \(removed by rule: .*'image size': 64"):
        filter_shards(str(scores), data, str(tmp_path / "none"), threshold=values[-1], min_words=5,
                      min_image_size=33, progress=False)
    assert not list((tmp_path / "none").glob("*.tar*"))
    # a scores file of other shards
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line.replace("held_out-", "train-") for line in open(scores)))
    with pytest.raises(ValueError, match="none of the 1 that --data matches .*score these shards first"):
        filter_shards(str(other), data, str(tmp_path / "o"), threshold=0.1, progress=False)
    # a kill inside a shard: its partial file is redone, finished shards are not
    (tmp_path / "half" / "report.json").unlink()
    (tmp_path / "half" / sorted(p.name for p in (tmp_path / "half").glob("*.tar"))[0]).rename(
        tmp_path / "half" / "held_out-000000.tar.partial")
    assert filter_shards(str(scores), data, str(tmp_path / "half"), top_fraction=0.5, progress=False)["kept"] == 32
    assert main(["data", "filter", "--scores", str(scores), "--data", data, "--out", str(tmp_path / "cli"),
                 "--threshold", str(values[9])]) == 0
    assert json.load(open(tmp_path / "cli" / "report.json"))["kept"] == 10


def test_bad_input_is_named(trained, tmp_path):
    data = str(trained / "synth" / "held_out-*.tar")
    with pytest.raises(ValueError, match="exactly one of --threshold and --top-fraction"):
        filter_shards(str(tmp_path / "none.jsonl"), data, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no scores file"):
        filter_shards(str(tmp_path / "none.jsonl"), data, str(tmp_path / "out"), threshold=0.1)
    with pytest.raises(ValueError, match="--top-fraction must be in"):
        filter_shards(str(tmp_path / "none.jsonl"), data, str(tmp_path / "out"), top_fraction=1.5)
    with pytest.raises(ValueError, match="matches no shards"):
        score(str(trained / "run"), str(tmp_path / "missing-*.tar"), str(tmp_path / "s.jsonl"), progress=False)
    with pytest.raises(SystemExit):
        main(["data", "filter", "--scores", "x", "--data", data, "--out", "o", "--threshold", "1", "--top-fraction",
              "0.5"])
