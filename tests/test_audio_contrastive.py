"""Task audio_contrastive (CLAP-style) on the bundled beeps: a run trains, scores zero-shot count x pitch
and retrieval, exports; load_clip gives the model with a preprocess that resamples any rate; DDP and
FSDP2 on two processes follow the single process; bad settings are named."""
import math

import pytest
import torch

import mmfast
from mmfast.cli import main
from mmfast.train import load_config, train
from tests.processes import launch_training
from tests.runs import losses

pytest.importorskip("webdataset")
TINY = ["--data.train_samples=64", "--data.held_out_samples=24", "--data.batch_size=16",
        "--model.audio.num_mel_bins=32", "--model.audio.max_length=48", "--model.audio.width=32",
        "--model.audio.layers=1", "--model.audio.heads=2", "--model.text.width=32", "--model.text.layers=1",
        "--model.text.heads=2", "--model.embed_dim=16", "--train.steps=4", "--train.eval_every=2",
        "--train.checkpoint_every=2", "--train.log_every=1", "--optim.warmup_steps=1"]


def _config(root, name, *extra):
    config = load_config("clap-tiny", [*TINY, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def test_a_run_trains_scores_and_loads_with_a_resampling_preprocess(tmp_path, capsys):
    result = train(_config(tmp_path, "run"), progress=False)
    assert {"zero_shot_accuracy", "count_accuracy", "pitch_accuracy", "audio_to_text_R@1", "other_zero_shot_accuracy",
            "text_to_audio_R@5"} <= result.keys()
    assert 0 <= result["zero_shot_accuracy"] <= 1 and len(losses(tmp_path / "run")) == 4
    model, preprocess, tokenizer = mmfast.load_clip(str(tmp_path / "run"))
    assert type(model).__name__ == "CLAP"
    tone = torch.sin(2 * math.pi * 250 * torch.arange(44100) / 44100)  # 1 s at 44.1 kHz
    clip = preprocess((tone.numpy(), 44100))
    assert clip.shape == (48 * 160,) and clip.dtype == torch.float32  # the model's 48 frames at 16 kHz
    stereo = preprocess((torch.stack([tone, tone]).numpy()[:, :8000], 44100))
    assert stereo.shape == clip.shape and stereo[4000:].abs().max() == 0  # mixed down, padded with silence
    with torch.no_grad():
        audio = model.encode_audio(torch.stack([clip, stereo]), normalize=True)
        text = model.encode_text(tokenizer(["one low beep", "three high beeps"]), normalize=True)
    assert audio.shape == text.shape == (2, 16)
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "zero_shot_accuracy" in capsys.readouterr().out
    with pytest.raises(ValueError, match="sample rate > 0"):
        preprocess((tone.numpy(), 0))


@pytest.mark.distributed
def test_two_processes_follow_the_single_one(tmp_path):
    launch_training(_config, tmp_path, [("single", [])], world=1)
    launch_training(_config, tmp_path, [("ddp", ["--engine.name=ddp"]), ("fsdp2", ["--engine.name=fsdp2"])])
    reference = list(losses(tmp_path / "single").values())
    for name in ("ddp", "fsdp2"):
        assert list(losses(tmp_path / name).values()) == pytest.approx(reference, abs=2e-4), name


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="reads the bundled audio clips"):
        train(_config(tmp_path, "bad", "--data.source=shards"), progress=False)
    with pytest.raises(ValueError, match="no gradient caching"):
        train(_config(tmp_path, "bad2", "--train.micro_batch=4"), progress=False)
