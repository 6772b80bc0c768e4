"""The unified any-to-any model (task unified): text causal and every modality span bidirectional in one
packed forward, flow-matching targets in the patch embedding's order, the generation metrics read the
truth off the bundled data, batches are a function of (seed, step) shared out over ranks, two processes
follow one on DDP, FSDP2 and ZeRO-2/3, and a finished run generates text, images and audio through
mmfast.load_unified and the CLI."""
import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mmfast
from mmfast.cli import main
from mmfast.data import synth, synth_media
from mmfast.data.synth_media import media_clip, other_beeps, reversed_clip_caption
from mmfast.models.image_autoencoder import image_values
from mmfast.models.llama import LlamaConfig
from mmfast.models.unified import (SPECIAL_TOKENS, UnifiedConfig, UnifiedModel, audio_values, fold_patches,
                                   patch_rows, span_sequence, waveforms_of)
from mmfast.train import load_config
from mmfast.train.tasks import build_task
from mmfast.train.tasks.unified import DIRECTIONS, IGNORE
from mmfast.train.unified_metrics import (ShapeClassifier, attributes_right, audio_right, beep_count,
                                          foreground_color, pitch_of)
from tests.processes import launch_training
from tests.runs import losses

TINY = ["--data.train_samples=64", "--data.held_out_samples=12", "--data.batch_size=10", "--model.vocab_size=200",
        "--model.text.hidden_size=32", "--model.text.intermediate_size=64", "--model.text.num_hidden_layers=2",
        "--model.text.num_attention_heads=2", "--model.head_width=32", "--model.eval_items=4",
        "--model.sample_steps=2", "--train.steps=4", "--train.eval_every=4", "--train.checkpoint_every=2",
        "--train.log_every=1", "--optim.warmup_steps=1",
        "--engine.precision=fp32"]  # the engines are compared in fp32; the recipe's bf16 against it below
PLACEMENT = type("Placement", (), dict(rank=0, world_size=1, is_main=True))


def unified_config(root, name, *extra):
    config = load_config("unified-tiny", [*TINY, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def _model(seed=0):
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=50 + len(SPECIAL_TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2)
    return UnifiedModel(UnifiedConfig(text=text, text_vocab_size=50, head_width=32)).eval()


def _image_then_caption(model, image, caption):
    ids = torch.tensor(span_sequence(model.config, "image") + caption)
    return ids, torch.tensor([0, len(ids)], dtype=torch.int32)


def test_text_is_causal_and_each_span_sees_itself_whole():
    model = _model()
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ids, cu_seqlens = _image_then_caption(model, images, [1, 7, 8, 9, 2])
    before = model(ids, cu_seqlens, images=image_values(images))["text"]
    # a later caption token changes nothing before it
    changed = ids.clone()
    changed[-2] = 11
    after = model(changed, cu_seqlens, images=image_values(images))["text"]
    torch.testing.assert_close(after[:-2], before[:-2])
    assert not torch.allclose(after[-2:], before[-2:])
    # the last patch changes the span's first token (bidirectional) but not the <image> token before it
    edited = images.clone()
    edited[:, :, -4:, -4:] = 255 - edited[:, :, -4:, -4:]
    after = model(ids, cu_seqlens, images=image_values(edited))["text"]
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


def test_packed_samples_do_not_see_each_other():
    model = _model()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    first, _ = _image_then_caption(model, images[:1], [1, 7, 2])
    second = torch.tensor([model.config.token_id("<to_audio>"), 1, 9, 2] + span_sequence(model.config, "audio"))
    waveform = torch.from_numpy(media_clip("audio", 0, "train", 0).data)[None]
    alone = model(first, torch.tensor([0, len(first)], dtype=torch.int32), images=image_values(images[:1]))["text"]
    both = model(torch.cat([first, second]), torch.tensor([0, len(first), len(first) + len(second)], dtype=torch.int32),
                 images=image_values(images[:1]), audio=audio_values(model.config, waveform),
                 audio_times=torch.tensor([0.5]))
    torch.testing.assert_close(both["text"][:len(first)], alone, rtol=1e-5, atol=1e-5)
    assert both["audio"].shape == (1, 25, 160)


def test_patch_rows_are_what_the_patch_embedding_projects_and_fold_back():
    model = _model()
    values = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rows = patch_rows(values, (4, 4))
    weight = model.image_in.weight.double()
    expected = torch.nn.functional.conv2d(values, weight, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(rows @ weight.flatten(1).T, expected)
    torch.testing.assert_close(fold_patches(rows, 3, (4, 4), (8, 8)), values)
    spectrogram = torch.randn(2, 1, 40, 100)
    torch.testing.assert_close(fold_patches(patch_rows(spectrogram, (40, 4)), 1, (40, 4), (1, 25)), spectrogram)


def test_the_metrics_read_the_truth_off_the_bundled_data_and_catch_wrong_answers():
    clips = [media_clip("audio", index, "held_out", 0) for index in range(60)]
    assert np.mean([all(audio_right(clip.data, 16000, clip.meta)) for clip in clips]) >= 0.95
    waveforms, metas = other_beeps(60)
    assert np.mean([all(audio_right(w, 16000, meta)) for w, meta in zip(waveforms, metas)]) >= 0.95
    # the vocoder keeps pitch and count: spectrogram values -> Griffin-Lim -> the same answers
    config = _model().config
    vocoded = waveforms_of(config, audio_values(config, torch.from_numpy(np.stack([c.data for c in clips[:30]]))))
    assert np.mean([all(audio_right(w, 16000, c.meta)) for w, c in zip(vocoded.numpy(), clips)]) >= 0.9
    assert pitch_of(np.zeros(16000), 16000) is None or beep_count(np.zeros(16000), 16000) != 1
    samples = [synth.generate(index, "held_out", 0, 32, 0.0, None) for index in range(100)]
    assert np.mean([foreground_color(np.asarray(s.image)) == s.meta["color"] for s in samples]) >= 0.9
    assert foreground_color(np.full((32, 32, 3), 90, np.uint8)) is None
    # the shape classifier, fitted on other bundled pictures, names the shapes of these
    fitted = [synth.generate(index, "train", 0, 32, 0.0, None) for index in range(1500)]
    pictures = lambda items: torch.stack([torch.from_numpy(np.asarray(s.image)).permute(2, 0, 1) for s in items])  # noqa: E731
    classifier = ShapeClassifier(pictures(fitted), [s.meta for s in fitted])
    assert np.mean([a == s.meta["shape"] for a, s in zip(classifier(pictures(samples)), samples)]) >= 0.8
    assert all(attributes_right("image", s.caption, s.meta) for s in samples)
    assert not attributes_right("image", "a red circle", {"color": "red", "shape": "square"})
    assert attributes_right("audio", "two low square-wave beeps", {"count": 2, "pitch": "low"})
    assert not attributes_right("video", "a red circle moving left", {"color": "red", "shape": "circle",
                                                                      "direction": "right"})


def _task(tmp_path, *extra, rank=0, world=1):
    config = unified_config(tmp_path, "batches", *extra)
    os.makedirs(config.run_dir, exist_ok=True)
    placement = type("Placement", (), dict(rank=rank, world_size=world, is_main=rank == 0))()
    task = build_task(config, placement)
    task.check(world)
    task.prepare(progress=False)
    return task


def test_batches_follow_seed_and_step_and_two_ranks_share_one_batch(tmp_path):
    task = _task(tmp_path)
    steps = task.batches(1, 0)
    first, second = next(steps), next(steps)
    resumed = next(task.batches(1, 1))
    for expected, got in zip(second, resumed):
        torch.testing.assert_close(got, expected)
    assert not torch.equal(first[3], second[3])
    config = task.model_config
    ids, labels, lengths, directions = first[:4]
    for row in range(len(ids)):
        sequence, targets = ids[row, :lengths[row]], labels[row, :lengths[row]]
        modality, generated = DIRECTIONS[directions[row]].split("_")[-1 if DIRECTIONS[directions[row]].startswith(
            "text") else 0], DIRECTIONS[directions[row]].startswith("text")
        span = torch.tensor(span_sequence(config, modality))
        if generated:  # <to_x> [caption] span: nothing supervised
            assert sequence[0] == config.token_id(f"<to_{modality}>") and torch.equal(sequence[-len(span):], span)
            assert (targets == IGNORE).all()
        else:  # span caption: each caption token after <sot> is the label of the position before it
            assert torch.equal(sequence[:len(span)], span) and sequence[len(span)] == config.sot_token_id
            assert sequence[-1] == config.eot_token_id
            torch.testing.assert_close(targets[len(span):-1], sequence[len(span) + 1:])
            assert (targets[:len(span)] == IGNORE).all() and targets[-1] == IGNORE
    halves = [next(_task(tmp_path, rank=rank, world=2).batches(1, 0)) for rank in (0, 1)]
    torch.testing.assert_close(torch.cat([halves[0][3], halves[1][3]]).sort().values, first[3].sort().values)
    # the global counts on every rank (over the ranks x micro-batches the engines average)
    torch.testing.assert_close(halves[0][10][0], 2 * first[10][0])
    torch.testing.assert_close(halves[1][10][0], 2 * first[10][0])


def test_reversed_clips_are_played_backwards_with_their_direction_turned_around(tmp_path):
    """model.video_reversed: the same draws as without it, each reversed clip's frames in the other order
    and its caption naming the opposite direction; a clip played backwards moves that way."""
    clip = media_clip("video", 3, "train", 0)
    centers = np.array(clip.meta["centers"])
    turned = reversed_clip_caption(clip.caption, clip.meta["direction"])
    opposite = synth_media.OPPOSITE[clip.meta["direction"]]
    assert turned.split() == [opposite if word == clip.meta["direction"] else word for word in clip.caption.split()]
    step = np.sign(np.round(centers[0] - centers[-1], 6))  # backwards: from the last center to the first
    assert tuple(step) == tuple(np.sign(synth_media.DIRECTIONS[opposite]))
    with pytest.raises(ValueError, match="expected the direction 'left' once"):
        reversed_clip_caption("a red circle moving right", "left")
    videos = "--model.directions={video_to_text: 1.0}"
    plain = next(_task(tmp_path, videos, "--model.video_reversed=0").batches(1, 0))  # the recipe reverses half
    task = _task(tmp_path, videos, "--model.video_reversed=1.0")
    backwards = next(task.batches(1, 0))
    torch.testing.assert_close(backwards[9], plain[9].flip(1))
    for row in range(len(plain[0])):
        words = [task.tokenizer.decode(batch[0][row, :batch[2][row]].tolist()).split() for batch in (plain, backwards)]
        changed = [(a, b) for a, b in zip(*words) if a != b]
        assert len(words[0]) == len(words[1]) and len(changed) == 1
        assert changed[0][1] == synth_media.OPPOSITE[changed[0][0]]


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="model.directions"):
        _task(tmp_path, "--model.directions={text_to_video: 1.0}")
    with pytest.raises(ValueError, match="caption_dropout"):
        _task(tmp_path, "--model.caption_dropout=1.5")
    with pytest.raises(ValueError, match=r"video_reversed must be in \[0, 1\], got 2"):
        _task(tmp_path, "--model.video_reversed=2")
    with pytest.raises(ValueError, match="data.image_size"):
        _task(tmp_path, "--data.image_size=16")
    with pytest.raises(ValueError, match="keyframe_index must index the 8 frames .* got 8"):
        UnifiedConfig(text=_model().config.text, text_vocab_size=50, video_keyframe=True, keyframe_index=8)
    with pytest.raises(ValueError, match=r"video_stride must be in \[1, video_patch = 8\], got 9"):
        UnifiedConfig(text=_model().config.text, text_vocab_size=50, video_stride=9)
    overlapping = UnifiedConfig(text=_model().config.text, text_vocab_size=50, video_patch=8, tubelet_size=8,
                                video_stride=4)
    assert overlapping.span_tokens("video") == 7 * 7  # (32 - 8) // 4 + 1 places a side, one time step
    frames = torch.randint(0, 256, (2, 8, 32, 32, 3), dtype=torch.uint8)
    assert UnifiedModel(overlapping).span_embeddings("video", frames).shape == (2, 49, 32)
    with pytest.raises(ValueError, match="video_keyframe enters a frame as an image"):
        UnifiedConfig(text=_model().config.text, text_vocab_size=50, video_size=16, video_keyframe=True)
    model = _model()
    with pytest.raises(ValueError, match="guidance"):
        model.generate_values("image", [torch.tensor([1, 2])], guidance=0.5)
    with pytest.raises(ValueError, match="modality"):
        model.generate_values("video", [torch.tensor([1, 2])])
    with pytest.raises(ValueError, match="patch tokens"):
        ids, cu_seqlens = _image_then_caption(model, None, [1, 2])
        model(ids, cu_seqlens)


@pytest.mark.distributed
def test_every_engine_follows_one_process_and_a_run_generates_every_way(tmp_path, capsys):
    launch_training(unified_config, tmp_path, [("single", []), ("bf16", ["--engine.precision=bf16"])], world=1)
    engines, low = [("ddp", ["--engine.name=ddp"]), ("fsdp2", ["--engine.name=fsdp2"])], []
    if importlib.util.find_spec("deepspeed") is not None:
        zero3 = ["--engine.name=deepspeed", "--engine.zero_stage=3"]
        engines += [("zero2", ["--engine.name=deepspeed", "--engine.zero_stage=2"]), ("zero3", zero3),
                    ("zero3-resumed", [*zero3, "--train.stop_after=2"]), ("zero3-resumed", zero3)]
        # in bf16 DeepSpeed holds the weights themselves in bf16 (no autocast): float inputs are cast to them
        low = [("zero2-bf16", ["--engine.name=deepspeed", "--engine.zero_stage=2", "--engine.precision=bf16"])]
    launch_training(unified_config, tmp_path, engines + low, world=2)
    single = losses(tmp_path / "single")
    assert single.keys() == {1, 2, 3, 4}
    for name, _ in engines:
        assert list(losses(tmp_path / name).values()) == pytest.approx(list(single.values()), abs=2e-4), name
    # bf16 autocast (the log-mel front end and the rotary tables kept in one dtype): near the fp32 losses
    for name in ["bf16"] + [name for name, _ in low]:
        assert list(losses(tmp_path / name).values()) == pytest.approx(list(single.values()), abs=5e-2), name
    rows = [json.loads(line) for line in open(tmp_path / "single" / "metrics.jsonl")]
    evaluation = [row for row in rows if "image_to_text" in row][-1]
    for key in ("audio_to_text", "video_to_text", "other_video_to_text", "text_to_image_color", "text_to_image_shape",
                "shape_classifier_real", "text_to_audio_pitch",
                "text_to_audio_count", "image_to_text_cider"):
        assert 0.0 <= evaluation[key] <= 10.0
    assert "text_loss" in rows[0] and "image_loss" in json.dumps(rows)
    assert os.path.exists(tmp_path / "single" / "samples.png")

    generator = mmfast.load_unified(str(tmp_path / "single"))
    sample = synth.generate(0, "held_out", 0, 32, 0.0, None)
    assert isinstance(generator.generate_text(image=sample.image.resize((48, 48))), str)
    clip = media_clip("audio", 0, "held_out", 0)
    resampled = np.interp(np.arange(0, 16000, 16000 / 22050), np.arange(16000), clip.data)
    assert isinstance(generator.generate_text(audio=(resampled, 22050)), str)  # another rate: resampled
    video = media_clip("video", 0, "held_out", 0).data
    assert isinstance(generator.generate_text(video=np.concatenate([video, video[:4]]), prompt="a"), str)
    picture = generator.generate_image("a red circle.", steps=2)
    assert picture.size == (32, 32)
    waveform, rate = generator.generate_audio("two high beeps", steps=2)
    assert rate == 16000 and waveform.shape == (16000,) and float(waveform.abs().max()) <= 0.9 + 1e-6
    with pytest.raises(ValueError, match="exactly one"):
        generator.generate_text(image=sample.image, audio=(clip.data, 16000))
    with pytest.raises(ValueError, match="non-empty"):
        generator.generate_image("  ")
    with pytest.raises(ValueError, match="guidance"):
        generator.generate_audio("one low beep", guidance=50.0)
    assert generator.steps == 2  # the run's sampling settings
    assert dataclasses.is_dataclass(mmfast.load(str(tmp_path / "single")).model.config)

    run, sound, picture_path = str(tmp_path / "single"), str(tmp_path / "beeps.wav"), str(tmp_path / "shape.png")
    assert main(["generate", run, "--to", "audio", "--prompt", "two high beeps", "--out", sound, "--steps", "2"]) == 0
    assert main(["generate", run, "--to", "image", "--prompt", "a red circle", "--out", picture_path]) == 0
    assert Image.open(picture_path).size == (32, 32)
    capsys.readouterr()
    assert main(["generate", run, "--audio", sound]) == 0 and capsys.readouterr().out.strip() != ""
    with pytest.raises(SystemExit, match="exactly one"):
        main(["generate", run])


@pytest.mark.parametrize("keyframe_index, frame", [(None, 4), (0, 0), (-1, 7)])
def test_video_keyframe_is_one_frame_as_an_image_then_the_tubelets(keyframe_index, frame):
    """With video_keyframe, a clip's span starts with one frame's image tokens (keyframe_index; None: the
    middle one; image_in and the image positions: exactly an image input's tokens) and goes on with its
    tubelets."""
    config = dataclasses.replace(_model().config, video_patch=8, tubelet_size=8, video_keyframe=True,
                                 keyframe_index=keyframe_index)
    model = UnifiedModel(config)
    assert config.tubelets() == 16 and config.span_tokens("video") == 64 + 16
    frames = torch.randint(0, 256, (2, 8, 32, 32, 3), dtype=torch.uint8)
    tokens = model.span_embeddings("video", frames)
    as_image = model.span_embeddings("image", image_values(frames[:, frame].permute(0, 3, 1, 2)))
    torch.testing.assert_close(tokens[:, :64], as_image)
    others = [index for index in range(8) if index != frame]  # no other frame gives those tokens
    assert all(not torch.allclose(tokens[:, :64], model.span_embeddings(
        "image", image_values(frames[:, index].permute(0, 3, 1, 2)))) for index in others)
    alone = dataclasses.replace(config, video_keyframe=False)
    without = UnifiedModel(alone)
    without.load_state_dict(model.state_dict())
    torch.testing.assert_close(tokens[:, 64:], without.span_embeddings("video", frames))
    ids = torch.tensor([config.sot_token_id, *span_sequence(config, "video"), 5, config.eot_token_id])
    out = model(ids, torch.tensor([0, len(ids)], dtype=torch.int32), video=frames[:1])
    assert out["text"].shape == (len(ids), config.text.vocab_size)
