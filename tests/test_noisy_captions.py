"""benchmarks/noisy_captions.py (issue 18's evidence) end to end at toy size: the noisy copy, the seed
CLIP, the captioner, score / filter / caption and the three compared runs, with the table's figures."""
import json
import os
import runpy

import pytest

from mmfast.data.pairs import tar_samples

pytest.importorskip("webdataset")
pytest.importorskip("tokenizers")


@pytest.mark.parametrize("caption_filter, caption_keep, seeds", [("seed", "threshold", 1), ("filtered", "top", 2)])
def test_the_noisy_captions_experiment_runs_end_to_end(tmp_path, caption_filter, caption_keep, seeds):
    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "noisy_captions.py"))
    results = script["main"](["--tiny", "--out", str(tmp_path), "--train", "200", "--held-out", "64",
                              "--seed-pairs", "64", "--seed-steps", "2", "--captioner-steps", "2", "--steps", "2",
                              "--batch", "16", "--caption-filter", caption_filter,
                              "--caption-keep", caption_keep, "--seeds", str(seeds)])
    noise = results["noise"]
    assert sum(noise.values()) == 200 and min(noise.values()) > 0
    captions = results["pseudo_captions"]
    assert results["uncaptioned_shards"] == noise["uncaptioned"] == captions["captioned"] >= captions["kept"]
    assert 0 <= captions["correct"]["color"] <= 1 and 0 <= captions["correct"]["shape"] <= 1
    assert isinstance(captions["filter_threshold"], float)
    if caption_keep == "top":  # the top 30 % of the pseudo-captions' scores (ties may add a few)
        assert captions["kept"] >= round(0.3 * captions["captioned"])
        assert captions["kept"] < captions["captioned"]
    assert results["filter"]["samples"] == 200  # the uncaptioned ones are removed for want of a score
    assert results["filter"]["removed_by_rule"]["no score"] == noise["uncaptioned"]
    assert results["filter"]["swapped"] == noise["swapped"] and 0 <= results["filter"]["recall"] <= 1
    assert set(results["runs"]) == {"(a) noisy", "(b) filtered", "(c) filtered + pseudo-captions"}
    assert all(0 <= run["zero_shot_accuracy"] <= 1 for run in results["runs"].values())
    assert {name: len(values) for name, values in results["seeds"].items()} == {
        "(b) filtered": seeds, "(c) filtered + pseudo-captions": seeds}
    assert results["seeds"]["(b) filtered"][0] == results["runs"]["(b) filtered"]["zero_shot_accuracy"]
    assert json.load(open(tmp_path / "results.json"))["runs"].keys() == results["runs"].keys()
    assert (tmp_path / "noisy_captions.png").stat().st_size > 0
    metas = [json.loads(sample["json"]) for shard in sorted((tmp_path / "noisy").glob("*.tar"))
             for _, sample in tar_samples(str(shard))]
    assert all(meta["true_caption"] for meta in metas if meta["noise"] == "swapped")
