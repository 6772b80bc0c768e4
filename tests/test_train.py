"""The contrastive trainer on the bundled data (tiny sizes): run files, metrics, exact resume, and
configuration errors that name the key."""
import json
import os

import pytest
import yaml

from mmfast.cli import main
from mmfast.train import load_config, train

pytest.importorskip("webdataset")
TINY = ["--data.train_samples=256", "--data.held_out_samples=64", "--data.batch_size=32",
        "--model.text.vocab_size=200", "--model.text.context_length=16", "--model.vision.width=64",
        "--model.vision.layers=1", "--model.vision.heads=2", "--model.text.width=64", "--model.text.layers=1",
        "--model.text.heads=2", "--model.embed_dim=32",
        "--train.steps=6", "--train.eval_every=3", "--train.checkpoint_every=3", "--train.log_every=1",
        "--optim.warmup_steps=2"]


def _config(tmp_path, name, *extra):
    config = load_config("clip-tiny", TINY + [f"--data.synth_dir={tmp_path / 'synth'}", *extra])
    config.run_dir = str(tmp_path / name)
    return config


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_run_writes_its_directory(tmp_path):
    result = train(_config(tmp_path, "run"), progress=False)
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "curves.png", "metrics.jsonl", "tokenizer.json",
                                       "tokenizer.json.json"]
    assert sorted(os.listdir(run / "checkpoints")) == ["latest.pt", "step-0000003.pt", "step-0000006.pt"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6
    assert 0.0 <= result["zero_shot_accuracy"] <= 1.0 and result["step"] == 6
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"lr", "samples_per_s", "logit_scale"} <= set(rows[0])
    assert [r["step"] for r in rows if "zero_shot_accuracy" in r] == [3, 6]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    train(_config(tmp_path, "straight"), progress=False)
    train(_config(tmp_path, "resumed", "--train.stop_after=3"), progress=False)
    assert sorted(_losses(tmp_path / "resumed")) == [1, 2, 3]
    train(_config(tmp_path, "resumed"), progress=False)  # picks up checkpoints/latest.pt at step 3
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def test_gradient_caching_run(tmp_path):
    train(_config(tmp_path, "cached", "--train.micro_batch=8", "--train.steps=2", "--train.eval_every=2"),
          progress=False)
    assert sorted(_losses(tmp_path / "cached")) == [1, 2]


def test_configuration_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'optim.learning_rate'"):
        load_config("clip-tiny", ["--optim.learning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"train.steps must be int, got 'many'"):
        load_config("clip-tiny", ["--train.steps=many"])
    with pytest.raises(ValueError, match="overrides look like --section.key=value"):
        load_config("clip-tiny", ["--optim.lr"])
    with pytest.raises(ValueError, match="no recipe 'clip-huge'"):
        load_config("clip-huge")
    config = load_config("clip-tiny", ["--optim.lr=3e-4", "--train.micro_batch=none", "--model.loss=siglip"])
    assert config.optim.lr == 3e-4 and config.train.micro_batch is None and config.model.loss == "siglip"


def test_cli_train_with_overrides(tmp_path, capsys):
    arguments = ["train", "--recipe", "clip-tiny", "--run-dir", str(tmp_path / "cli"), *TINY,
                 f"--data.synth_dir={tmp_path / 'synth'}", "--train.steps=2", "--train.eval_every=2"]
    assert main(arguments) == 0
    assert f"run directory: {tmp_path / 'cli'}" in capsys.readouterr().out
