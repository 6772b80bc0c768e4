"""data.sources / data.mixture: each source's share of the batches by weight, temperature or size,
every source read once per epoch, caps on repeats, the same batches after a resume, per-source counts
in the metrics, and bad mixtures named."""
import json

import numpy as np
import pytest
import torch

from mmfast.data.mixture import Mixture, mixture_probabilities
from mmfast.data.synth import write_shards
from mmfast.train import train
from tests.runs import losses
from tests.test_train import _config

SIZES = {"big": 900, "small": 100}


def test_probabilities_by_weight_temperature_and_size():
    assert mixture_probabilities(SIZES) == pytest.approx({"big": 0.9, "small": 0.1})
    assert mixture_probabilities(SIZES, {"big": 1, "small": 3}) == pytest.approx({"big": 0.25, "small": 0.75})
    assert mixture_probabilities(SIZES, temperature=1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    assert mixture_probabilities(SIZES, temperature=2.0) == pytest.approx({"big": 30 / 40, "small": 10 / 40})
    flat = mixture_probabilities(SIZES, temperature=1000.0)
    assert abs(flat["big"] - 0.5) < 0.01
    with pytest.raises(ValueError, match=r"weight to each of data.sources.*missing \['small'\]"):
        mixture_probabilities(SIZES, {"big": 1})
    with pytest.raises(ValueError, match=r"unknown \['web'\]"):
        mixture_probabilities(SIZES, {"big": 1, "small": 1, "web": 1})
    with pytest.raises(ValueError, match="exclude each other"):
        mixture_probabilities(SIZES, {"big": 1, "small": 1}, temperature=2.0)
    with pytest.raises(ValueError, match="not all 0"):
        mixture_probabilities(SIZES, {"big": 0, "small": 0})


def _source_of(rows):
    return np.where(rows.numpy() < SIZES["big"], "big", "small")


def test_shares_follow_the_weights_and_each_source_is_read_once_per_epoch():
    mixture = Mixture(SIZES, {"big": 0.5, "small": 0.5}, batch=64, seed=3)
    batches = [mixture.rows(step) for step in range(100)]
    assert all(len(rows) == 64 for rows in batches)
    rows = torch.cat(batches)
    assert rows.min() >= 0 and rows.max() < 1000
    share = (_source_of(rows) == "small").mean()
    assert abs(share - 0.5) < 0.03  # 6,400 draws: the standard deviation of the share is 0.006
    seen = mixture.seen()
    assert seen["samples_small"] + seen["samples_big"] == 6400
    assert seen["epochs_small"] == seen["samples_small"] / 100
    # a permutation per epoch: every sample of a source is taken as often as the others, give or take one
    for taken, size in ((rows[rows >= 900] - 900, 100), (rows[rows < 900], 900)):
        counts = torch.bincount(taken, minlength=size)
        assert counts.max() - counts.min() <= 1 and counts.sum() == len(taken)
    # both sources appear within one batch: the batch is shuffled, not one source after the other
    sources = _source_of(batches[0])
    assert (sources[:32] == "small").any() and (sources[:32] == "big").any()


def test_a_resumed_mixture_draws_the_uninterrupted_batches():
    straight = Mixture(SIZES, {"big": 0.3, "small": 0.7}, batch=32, seed=1, max_epochs={"small": 2})
    expected = [straight.rows(step) for step in range(20)]
    resumed = Mixture(SIZES, {"big": 0.3, "small": 0.7}, batch=32, seed=1, max_epochs={"small": 2})
    for step in range(11, 20):
        assert torch.equal(resumed.rows(step), expected[step])
    assert resumed.seen() == straight.seen()
    with pytest.raises(ValueError, match="in order"):
        resumed.rows(3)


def test_a_capped_source_gives_its_share_to_the_others():
    mixture = Mixture(SIZES, {"big": 0.5, "small": 0.5}, batch=50, seed=0, max_epochs={"small": 1.5})
    rows = torch.cat([mixture.rows(step) for step in range(20)])  # 1,000 rows; small holds 150
    assert (_source_of(rows) == "small").sum() == 150 and mixture.seen()["epochs_small"] == 1.5
    capped = Mixture(SIZES, {"big": 0.5, "small": 0.5}, batch=50, seed=0, max_epochs={"small": 1, "big": 1})
    with pytest.raises(ValueError, match="every source of data.sources has reached its data.max_epochs"):
        for step in range(21):
            capped.rows(step)
    with pytest.raises(ValueError, match=r"data.max_epochs names sources that data.sources does not have: \['web'\]"):
        Mixture(SIZES, {"big": 0.5, "small": 0.5}, batch=50, seed=0, max_epochs={"web": 1})


def test_a_run_mixes_two_sources_logs_them_and_resumes_exactly(tmp_path):
    write_shards(str(tmp_path / "first"), train=96, held_out=8, size=32, seed=1, progress=False)
    write_shards(str(tmp_path / "second"), train=32, held_out=8, size=32, seed=2, progress=False)
    mix = [f"--data.sources={{first: '{tmp_path}/first/train-*.tar', second: '{tmp_path}/second/train-*.tar'}}",
           "--data.mixture={first: 1, second: 3}", "--data.max_epochs={second: 3}"]
    train(_config(tmp_path, "mixed", *mix), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "mixed" / "metrics.jsonl")]
    logged = [row for row in rows if "samples_second" in row]
    assert [row["step"] for row in logged] == [1, 2, 3, 4, 5, 6]
    last = logged[-1]
    assert last["samples_first"] + last["samples_second"] == 6 * 32
    assert last["samples_second"] == 96 and last["epochs_second"] == 3.0  # 96 of 192: capped, the rest from first
    assert last["epochs_first"] == pytest.approx(96 / 96)
    train(_config(tmp_path, "resumed", *mix, "--train.stop_after=3"), progress=False)
    train(_config(tmp_path, "resumed", *mix), progress=False)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "mixed")


def test_bad_mixtures_are_named(tmp_path):
    sources = "--data.sources={a: synth, b: synth}"
    cases = [(["--data.mixture={a: 1}"], "needs data.sources"),
             ([sources, "--data.train=x-*.tar"], "data.sources replaces data.train"),
             ([sources, "--data.mixture={a: 1, c: 2}"], r"unknown \['c'\], missing \['b'\]"),
             ([sources, "--data.streaming=true"], "data.streaming must be false"),
             ([sources, "--task=llava"], "data.sources mixes image-caption sets"),
             (["--data.sources={'a b': synth}"], "letters, digits"),
             (["--data.sources={a: /nowhere/x-*.tar}"], "data.sources.a matches no shards")]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            train(_config(tmp_path, "bad", *extra), progress=False)
