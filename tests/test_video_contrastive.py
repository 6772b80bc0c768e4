"""Task video_contrastive: a video-text CLIP over tubelets and the frame-pooling baseline on the bundled
moving shapes, its zero-shot classes as the captions say them, loading through mmfast.load_clip with a
preprocess that takes clips of any length and size, and bad settings named."""
import numpy as np
import pytest
import torch

import mmfast
from mmfast.models.video import VideoConfig
from mmfast.models.video_clip import VideoCLIP, VideoClipConfig
from mmfast.models.clip import TextConfig
from mmfast.train import load_config, train
from mmfast.data.synth_media import load_media_split
from mmfast.train.tasks.video_contrastive import class_prompts

pytest.importorskip("webdataset")
TINY = ["--data.train_samples=64", "--data.held_out_samples=32", "--data.batch_size=16", "--model.embed_dim=16",
        "--model.video.width=32", "--model.video.layers=1", "--model.video.heads=2", "--model.text.width=32",
        "--model.text.layers=1", "--model.text.heads=2", "--train.steps=2", "--train.eval_every=2",
        "--train.checkpoint_every=2", "--train.log_every=1"]


def _config(root, name, *extra):
    config = load_config("video-clip-tiny", [*TINY, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def _model(tower):
    torch.manual_seed(0)
    video = VideoConfig(image_size=32, patch_size=8, frames=8, width=32, layers=1, heads=2, mean=(0.5,) * 3,
                        std=(0.25,) * 3)
    return VideoCLIP(VideoClipConfig(embed_dim=16, video=video, tower=tower,
                                     text=TextConfig(vocab_size=50, context_length=8, width=32, layers=1,
                                                     heads=2))).eval()


def test_frame_pooling_cannot_see_the_order_of_frames_and_tubelets_can():
    frames = torch.randint(0, 256, (2, 8, 32, 32, 3), dtype=torch.uint8)
    backwards = frames.flip(1)  # the same frames, played the other way
    with torch.no_grad():
        pooled = _model("frames")
        torch.testing.assert_close(pooled.encode_video(frames), pooled.encode_video(backwards), rtol=1e-5, atol=1e-5)
        tubelets = _model("tubelets")
        assert not torch.allclose(tubelets.encode_video(frames), tubelets.encode_video(backwards), atol=1e-3)
    with pytest.raises(ValueError, match=r"expected frames \[B, 8, 32, 32, 3\]"):
        tubelets.encode_video(frames[:, :4])
    with pytest.raises(ValueError, match="tower must be one of"):
        VideoClipConfig(tower="pixels")


def test_a_run_trains_evaluates_and_loads(tmp_path):
    result = train(_config(tmp_path, "run"), progress=False)
    assert {"zero_shot_accuracy", "color_accuracy", "shape_accuracy", "direction_accuracy", "video_to_text_R@1",
            "text_to_video_R@5", "other_zero_shot_accuracy", "other_direction_accuracy",
            "other_zero_shot_accuracy_light"} <= result.keys()
    # the zero-shot classes are what the captions say: every held-out caption is its clip's class prompt
    classes, prompts = class_prompts()
    _, captions, metas = load_media_split(str(tmp_path / "synth"), "held_out")
    lookup = dict(zip(classes, (group[0] for group in prompts)))
    assert len(classes) == 144 and all(lookup[(m["color"], m["shape"], m["direction"])] == c
                                       for c, m in zip(captions, metas))
    model, preprocess, tokenizer = mmfast.load_clip(str(tmp_path / "run"))
    clip = np.random.default_rng(0).integers(0, 256, (13, 48, 40, 3), dtype=np.uint8)  # any length and size
    frames = preprocess(clip)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == torch.uint8
    with torch.no_grad():
        video = model.encode_video(torch.stack([frames, frames]), normalize=True)
        text = model.encode_text(tokenizer(["a red circle moving left"]), normalize=True)
    assert video.shape == (2, 16) and text.shape == (1, 16)
    with pytest.raises(ValueError, match=r"expected uint8 frames \[T, H, W, 3\]"):
        preprocess(clip[..., 0])
    baseline = train(_config(tmp_path, "frames", "--model.tower=frames"), progress=False)
    assert 0 <= baseline["direction_accuracy"] <= 1


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="data.image_size must be 32, got 16"):
        train(_config(tmp_path, "a", "--data.image_size=16"), progress=False)
    with pytest.raises(ValueError, match=r"model.tower must be one of \['tubelets', 'frames'\]"):
        train(_config(tmp_path, "b", "--model.tower=pixels"), progress=False)
    with pytest.raises(ValueError, match="reads the bundled video clips"):
        train(_config(tmp_path, "c", "--data.source=shards", "--data.train=x.tar"), progress=False)
