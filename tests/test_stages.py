"""Freezing by name prefix, per-prefix learning rates, and multi-stage recipes (a frozen module in
the first stage, a resume mid-stage after a stop, finished stages skipped on a re-run)."""
import os

import pytest
import torch

from mmfast.train import load_config, train
from mmfast.train.checkpoint import consolidate
from mmfast.train.engines.base import freeze, parameter_groups
from tests.runs import losses

pytest.importorskip("webdataset")
TINY = ["--data.train_samples=128", "--data.held_out_samples=32", "--data.batch_size=16",
        "--model.text.vocab_size=200", "--model.text.context_length=16", "--model.vision.width=32",
        "--model.vision.layers=1", "--model.vision.heads=2", "--model.text.width=32", "--model.text.layers=1",
        "--model.text.heads=2", "--model.embed_dim=16", "--train.steps=4", "--train.eval_every=4",
        "--train.checkpoint_every=2", "--train.log_every=1", "--optim.warmup_steps=1"]
STAGES = [{"name": "align", "train": {"frozen": ["text_model"]}},
          {"name": "tune", "optim": {"lr": 5e-4}, "train": {"steps": 3}}]


def _config(root, name, *extra):
    config = load_config("clip-tiny", [*TINY, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def _weights(folder):
    return consolidate(str(folder))


def test_parameter_groups_take_their_prefix_lr_and_freezing_drops_parameters():
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(4, 4))
    model.add_module("head", torch.nn.Linear(4, 2))
    groups = parameter_groups(model, 0.1, {"head": 0.5, "head.bias": 0.25})
    layout = [(group.get("lr"), group["weight_decay"], [tuple(p.shape) for p in group["params"]]) for group in groups]
    # without a prefix: decayed matrices first, then the rest (the layout of earlier checkpoints)
    assert layout == [(None, 0.1, [(4, 4)]), (None, 0.0, [(4,)]), (0.5, 0.1, [(2, 4)]), (0.25, 0.0, [(2,)])]
    freeze(model, frozen=["encoder"])
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    freeze(model, trainable=["head.bias"])
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["head.bias"]
    with pytest.raises(ValueError, match=r"train.frozen names 'decoder', which no parameter starts with; .*"
                                         r"\['encoder', 'head'\]"):
        freeze(model, frozen=["decoder"])
    with pytest.raises(ValueError, match="optim.lr_groups names 'enc'"):
        parameter_groups(model, 0.1, {"enc": 1.0})


def test_frozen_modules_stay_and_the_others_train(tmp_path):
    config = _config(tmp_path, "frozen", "--train.frozen=[text_model, logit_scale]",
                     "--optim.lr_groups={visual_projection: 1.0e-2}")
    train(config, progress=False)
    first = _weights(tmp_path / "frozen" / "checkpoints" / "step-0000002")
    last = _weights(tmp_path / "frozen" / "checkpoints" / "step-0000004")
    moved = {name for name in first if not torch.equal(first[name], last[name])}
    assert moved and not any(name.startswith(("text_model.", "logit_scale")) for name in moved)
    assert any(name.startswith("vision_model.") for name in moved) and "visual_projection.weight" in moved


def test_stages_run_in_order_resume_mid_stage_and_skip_finished_ones(tmp_path):
    whole = _config(tmp_path, "whole")
    whole.stages = STAGES
    train(whole, progress=False)
    align, tune = tmp_path / "whole" / "align", tmp_path / "whole" / "tune"
    assert (align / "model.pt").exists() and (tune / "model.pt").exists()
    assert len(losses(align)) == 4 and len(losses(tune)) == 3
    # the frozen tower did not move in the first stage, and the second started from the first's weights
    assert all(torch.equal(value, _weights(align / "checkpoints" / "step-0000002")[name])
               for name, value in _weights(align / "checkpoints" / "step-0000004").items()
               if name.startswith("text_model."))
    assert load_config(path=str(tune / "config.yaml")).train.init_from == str(align / "model.pt")

    stopped = _config(tmp_path, "stopped", "--train.stop_after=2")
    stopped.stages = STAGES
    train(stopped, progress=False)  # stops inside the first stage: the second waits
    assert not (tmp_path / "stopped" / "align" / "model.pt").exists()
    assert not (tmp_path / "stopped" / "tune").exists()
    again = _config(tmp_path, "stopped")
    again.stages = STAGES
    train(again, progress=False)  # resumes the first stage at step 2, then runs the second
    for stage in ("align", "tune"):
        assert losses(tmp_path / "stopped" / stage) == losses(tmp_path / "whole" / stage)
    metrics = (tmp_path / "stopped" / "tune" / "metrics.jsonl").read_text()
    once_more = _config(tmp_path, "stopped")
    once_more.stages = STAGES
    train(once_more, progress=False)  # both finished: nothing runs
    assert (tmp_path / "stopped" / "tune" / "metrics.jsonl").read_text() == metrics


def test_stage_errors_name_the_stage(tmp_path):
    config = _config(tmp_path, "bad")
    config.stages = [{"name": "one", "train": {"stepz": 3}}]
    with pytest.raises(ValueError, match=r"unknown key 'stages\[0\].train.stepz'"):
        train(config, progress=False)
    config.stages = [{"name": "one"}, {"name": "one"}]
    with pytest.raises(ValueError, match=r"stages\[1\].name must be a new folder name, got 'one'"):
        train(config, progress=False)


def test_any_task_loads_evaluates_and_exports_from_its_run(tmp_path, capsys):
    import mmfast
    from mmfast.cli import main

    config = _config(tmp_path, "lm", "--task=caption_lm")
    trained = train(config, progress=False)
    model, tokenizer = mmfast.load(config.run_dir)
    assert type(model).__name__ == "CaptionLM" and not model.training
    assert model(tokenizer(["a red circle."])).shape == (1, 16, tokenizer.vocab_size)
    with pytest.raises(ValueError, match="holds a 'caption_lm' model, not a CLIP; use mmfast.load"):
        mmfast.load_clip(config.run_dir)
    capsys.readouterr()
    assert main(["eval", config.run_dir]) == 0
    scores = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["held_out_loss"] == pytest.approx(trained["held_out_loss"], rel=1e-6)
    os.remove(os.path.join(config.run_dir, "model.pt"))
    assert main(["export", config.run_dir]) == 0
    assert mmfast.load(config.run_dir)[0].head.weight.shape[0] == tokenizer.vocab_size
    path = os.path.join(config.run_dir, "model.pt")  # the earlier file layout: the text config alone
    saved = torch.load(path, weights_only=True)
    saved["text_config"] = saved.pop("model_config")["text"]
    torch.save(saved, path)
    torch.testing.assert_close(mmfast.load(config.run_dir)[0](tokenizer(["a red circle."])),
                               model(tokenizer(["a red circle."])))
