"""The contrastive task through the task interface gives the losses the trainer gave before it had
one: short loss curves recorded on a fixed seed (tests/data/contrastive_losses.json, written by the
trainer of the commit that added it, on the bundled data format it names; re-recorded when the CLIP
model's initialization and the clip-tiny recipe changed, 2026-11-27) must come out again, to float32
rounding: bit for bit on the machine that recorded them, while another machine with the same torch wheel
and data differed from the first step in the last bit or two (its CPU's vector code rounds otherwise)."""
import json
import os

import pytest

from mmfast.train import train
from mmfast.data.splits import SYNTH_FORMAT
from tests.runs import losses, run_config

pytest.importorskip("webdataset")
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "contrastive_losses.json")
SETTINGS = ["--data.train_samples=256", "--data.held_out_samples=64", "--data.batch_size=32",
            "--data.image_size=32", "--data.synth_geometry=anchored", "--model.vision.patch_size=8",
            "--model.text.vocab_size=200", "--model.text.context_length=16", "--model.vision.width=64",
            "--model.vision.layers=1", "--model.vision.heads=2", "--model.text.width=64", "--model.text.layers=1",
            "--model.text.heads=2", "--model.embed_dim=32", "--train.steps=8", "--train.eval_every=8",
            "--train.checkpoint_every=8", "--train.log_every=1", "--optim.warmup_steps=2",
            # the recipe's settings when the curves were recorded (clip-tiny moved to GELU and shapes only)
            "--model.activation=quick_gelu", "--data.digit_fraction=0.1"]
CASES = {"clip": [], "siglip": ["--model.loss=siglip"], "accumulation": ["--train.accumulation_steps=2"],
         "grad-cache": ["--train.micro_batch=8"]}


def record(root) -> dict:
    """The curves the test compares (run this to re-record after a change of the bundled data or of the
    model's initialization)."""
    return {"synth_format": SYNTH_FORMAT,
            "losses": {name: losses(_run(root, name, extra)) for name, extra in CASES.items()}}


def _run(root, name, extra):
    config = run_config(root, name, SETTINGS, *extra)
    train(config, progress=False)
    return config.run_dir


@pytest.mark.parametrize("name", list(CASES))
def test_losses_equal_the_recorded_curve(tmp_path, name):
    with open(REFERENCE) as handle:
        reference = json.load(handle)
    assert reference["synth_format"] == SYNTH_FORMAT, "the bundled data changed: re-record with record()"
    got = losses(_run(tmp_path, name, CASES[name]))
    expected = {int(step): loss for step, loss in reference["losses"][name].items()}
    assert got.keys() == expected.keys()
    for step, loss in expected.items():  # a changed model, data order or loss moves far more than this
        assert got[step] == pytest.approx(loss, rel=2e-6, abs=0), step
