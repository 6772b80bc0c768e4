"""Masked-autoencoder pretraining (tasks mae, videomae and audiomae): the encoder sees only the kept
patches (tube masking for video, spectrogram patches for audio), the loss counts the hidden ones
against per-patch normalized targets, batches hide the same patches after a resume, two processes
follow one, the probe measures what it should, and the towers carry over to a contrastive, a LLaVA,
a video-text and an audio-text run."""

import numpy as np
import pytest
import torch

import mmfast
from mmfast.models.audio import AudioConfig
from mmfast.models.clip import VisionConfig
from mmfast.models.mae import (AudioMaeConfig, AudioMaskedAutoencoder, MaeConfig, MaskedAutoencoder, VideoMaeConfig,
                               VideoMaskedAutoencoder, patch_pixels, random_keep)
from mmfast.models.video import VideoConfig
from mmfast.ops import patch_embed
from mmfast.train import load_config, train
from mmfast.train.probe import linear_probe
from tests.processes import assert_ddp_follows_one_process
from tests.runs import prepared_task

MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
# the tiny tower LLaVA's tests build, so one MAE run serves the contrastive and the LLaVA hand-over
TOWER = ["--model.vision.width=32", "--model.vision.layers=2", "--model.vision.heads=2",
         "--model.vision.patch_size=8", "--model.vision.patch_stride=8", "--data.image_size=16"]
TINY = ["--data.train_samples=96", "--data.held_out_samples=16", "--data.batch_size=16", "--model.decoder_width=16",
        "--model.decoder_layers=1", "--model.decoder_heads=2", "--train.steps=4", "--train.eval_every=4",
        "--train.checkpoint_every=2", "--train.log_every=1", "--optim.warmup_steps=1", *TOWER]


def mae_config(root, name, *extra):
    config = load_config("mae-tiny", [*TINY, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def _model(mask_ratio=0.75, seed=0):
    torch.manual_seed(seed)
    vision = VisionConfig(image_size=24, patch_size=4, width=32, layers=2, heads=2, mean=MEAN, std=STD)
    return MaskedAutoencoder(MaeConfig(vision=vision, mask_ratio=mask_ratio, decoder_width=16, decoder_layers=1,
                                       decoder_heads=2)).eval()


def _pixels(batch=3, seed=1):
    return torch.randint(0, 256, (batch, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_encoder_never_sees_the_hidden_patches():
    model, pixels = _model(), _pixels()
    keep = random_keep(3, model.num_patches, model.num_kept, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 9) and model.num_patches == 36
    changed = pixels.clone()
    for sample in range(3):
        for patch in set(range(36)) - set(keep[sample].tolist()):
            row, column = divmod(patch, 6)
            changed[sample, :, row * 4:(row + 1) * 4, column * 4:(column + 1) * 4] = 255 - changed[
                sample, :, row * 4:(row + 1) * 4, column * 4:(column + 1) * 4]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_visible(changed, keep), model.encode_visible(pixels, keep))
        # ... while a visible patch does change it
        changed[0, :, :4, :4] = 255 - changed[0, :, :4, :4]
        visible = torch.zeros(3, 36, dtype=torch.bool)
        visible.scatter_(1, keep, True)
        if visible[0, 0]:
            assert not torch.allclose(model.encode_visible(changed, keep), model.encode_visible(pixels, keep))


def test_the_loss_counts_the_hidden_patches_against_normalized_pixels():
    model, pixels = _model(), _pixels()
    keep = random_keep(3, model.num_patches, model.num_kept, torch.Generator().manual_seed(2))
    output = model(pixels, keep)
    # the targets by hand: normalized pixels, patch by patch in the patch embedding's (channel, row, column) order
    normalized = (pixels.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    expected_loss, count = 0.0, 0
    for sample in range(3):
        for patch in set(range(36)) - set(keep[sample].tolist()):
            row, column = divmod(patch, 6)
            target = normalized[sample, :, row * 4:(row + 1) * 4, column * 4:(column + 1) * 4].reshape(-1)
            target = (target - target.mean()) / (target.var() + 1e-6) ** 0.5
            expected_loss += (output["prediction"][sample, patch] - target).square().mean().item()
            count += 1
    assert count == 3 * 27 and int(output["hidden"].sum()) == count
    assert output["loss"].item() == pytest.approx(expected_loss / count, rel=1e-5)


def test_patch_pixels_follow_the_patch_embedding_order():
    """The reconstruction targets line up with what the encoder's patch embedding projects."""
    model, pixels = _model(), _pixels()
    embeddings = model.vision_model.embeddings
    tokens = patch_embed(pixels, embeddings.patch_embedding.weight, mean=MEAN, std=STD, backend="reference")
    by_hand = patch_pixels(pixels, model.config.vision) @ embeddings.patch_embedding.weight.flatten(1).T
    torch.testing.assert_close(by_hand, tokens, rtol=1e-4, atol=1e-4)


def test_linear_probe_reads_a_separable_label_and_not_a_random_one():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    centres = torch.randn(4, 16, generator=generator) * 3
    features = centres[labels] + torch.randn(400, 16, generator=generator)
    assert linear_probe(features[:300], labels[:300], features[300:], labels[300:], 4) > 0.95
    shuffled = labels[torch.randperm(400, generator=generator)]
    assert linear_probe(features[:300], shuffled[:300], features[300:], shuffled[300:], 4) < 0.5
    with pytest.raises(ValueError, match="differ in length: 300 vs 299"):
        linear_probe(features[:300], labels[:299], features[300:], labels[300:], 4)


def test_probe_features_are_mae_global_pool_of_the_patch_tokens_before_the_final_norm():
    model, pixels = _model(), _pixels()
    with torch.no_grad():
        before = model.features(pixels)
        model.vision_model.post_layernorm.weight.mul_(3.0)  # the final norm does not enter
        torch.testing.assert_close(model.features(pixels), before)
        states = model.vision_model.token_states(pixels)
    assert before.shape == (3, 32)
    torch.testing.assert_close(before, states[:, 1:].mean(1))  # the patches' mean, not the class token's state
    assert not torch.allclose(before, states.mean(1))


def test_positions_are_mae_fixed_sincos_tables_or_learned_ones():
    model = _model()
    encoder = model.vision_model.embeddings.position_embedding.weight  # [1 + 36, 32]: class token, 6 x 6 places
    for table in (encoder, model.decoder_position[0]):
        assert not table.requires_grad and torch.equal(table[0], torch.zeros_like(table[0]))
        width = table.shape[-1]
        # place (row 2, column 5): rows' 1-D table in the first half of the channels, columns' in the second
        angle_row, angle_column = 2.0, 5.0  # channel pair 0 turns at rate 10000^0 = 1 per place
        assert torch.allclose(table[1 + 2 * 6 + 5, :2], torch.tensor([np.sin(angle_row), np.cos(angle_row)]).float())
        assert torch.allclose(table[1 + 2 * 6 + 5, width // 2:width // 2 + 2],
                              torch.tensor([np.sin(angle_column), np.cos(angle_column)]).float())
    # the optimizer never sees them; they still reach the state dict, so the tower carries them over
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "decoder_position" not in trainable and "vision_model.embeddings.position_embedding.weight" not in trainable
    assert "vision_model.embeddings.position_embedding.weight" in model.state_dict()
    vision = VisionConfig(image_size=24, patch_size=4, width=32, layers=2, heads=2, mean=MEAN, std=STD)
    learned = MaskedAutoencoder(MaeConfig(vision=vision, decoder_width=16, decoder_layers=1, decoder_heads=2,
                                          position_embedding="learned"))
    assert learned.decoder_position.requires_grad and learned.decoder_position.abs().max() < 0.2


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="position_embedding must be one of .'sincos', 'learned'., got 'rope'"):
        MaeConfig(vision=VisionConfig(image_size=24, patch_size=4), position_embedding="rope")
    with pytest.raises(ValueError, match="sincos_grid_table: width must be a multiple of 4"):
        MaskedAutoencoder(MaeConfig(vision=VisionConfig(image_size=24, patch_size=4, width=30, heads=2),
                                    decoder_width=16, decoder_layers=1, decoder_heads=2))
    with pytest.raises(ValueError, match="mask_ratio must leave at least one patch visible and one hidden of the 36"):
        MaeConfig(vision=VisionConfig(image_size=24, patch_size=4), mask_ratio=1.0)
    with pytest.raises(ValueError, match="video.patch_stride must be the patch size .8.: overlapping tubelets"):
        VideoMaeConfig(video=VideoConfig(image_size=32, patch_size=8, patch_stride=4, frames=8))
    model = _model()
    with pytest.raises(ValueError, match=r"keep must be \[3, 9\] .* got \(3, 10\)"):
        model(_pixels(), torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="task mae reads one training set in memory"):
        train(mae_config(tmp_path, "streamed", "--data.streaming=true", "--data.source=shards"), progress=False)


def test_batches_hide_the_same_patches_after_a_resume(tmp_path):
    task = prepared_task(mae_config(tmp_path, "batches"))
    first = [next(iter_) for iter_ in [task.batches(1, 0)] for _ in range(3)]
    resumed = next(task.batches(1, 2))
    torch.testing.assert_close(resumed[0], first[2][0])
    torch.testing.assert_close(resumed[1], first[2][1])
    assert not torch.equal(first[0][1], first[1][1])  # each step hides other patches


@pytest.mark.distributed
def test_two_processes_follow_one_and_the_tower_carries_over(tmp_path):
    assert_ddp_follows_one_process(mae_config, tmp_path)
    metrics = [line for line in open(tmp_path / "single" / "metrics.jsonl") if "probe_accuracy" in line]
    assert metrics and "random_probe_accuracy" in metrics[-1] and "other_probe_accuracy" in metrics[-1]
    mae = torch.load(tmp_path / "single" / "model.pt", weights_only=False)
    tower = {key: value for key, value in mae["state_dict"].items() if key.startswith("vision_model.")}
    assert tower

    # a contrastive run starts from the MAE's tower (frozen here: the weights it saves are the ones it started from)
    clip = load_config("clip-tiny", [*TOWER, "--train.steps=1", "--train.trainable=[text_model,text_projection]",
                                     "--train.eval_every=1", "--train.checkpoint_every=1", "--data.train_samples=96",
                                     "--data.held_out_samples=16", "--data.batch_size=16",
                                     f"--data.synth_dir={tmp_path / 'synth'}",
                                     f"--train.init_from={tmp_path / 'single'}"])
    clip.run_dir = str(tmp_path / "clip")
    train(clip, progress=False)
    saved = torch.load(tmp_path / "clip" / "model.pt", weights_only=False)["state_dict"]
    for key, value in tower.items():
        torch.testing.assert_close(saved[key], value, msg=key)

    # and so does a LLaVA run (its tower: the blocks up to the feature layer, without the final norm)
    llava = load_config("llava-tiny", ["--data.train_samples=48", "--data.held_out_samples=8", "--data.batch_size=8",
                                       *TOWER, "--model.text.vocab_size=300", "--model.text.hidden_size=32",
                                       "--model.text.intermediate_size=64", "--model.text.num_hidden_layers=2",
                                       "--model.text.num_attention_heads=2", "--model.text.num_key_value_heads=1",
                                       "--train.steps=1", "--train.eval_every=100",
                                       "--train.checkpoint_every=1", "--data.template=plain",
                                       "--train.trainable=[model.multi_modal_projector]",
                                       f"--data.synth_dir={tmp_path / 'llava-synth'}",
                                       f"--train.init_from={tmp_path / 'single' / 'model.pt'}"])
    llava.stages, llava.run_dir = [], str(tmp_path / "llava")
    train(llava, progress=False)
    saved = torch.load(tmp_path / "llava" / "model.pt", weights_only=False)["state_dict"]
    carried = [key for key in tower if "post_layernorm" not in key]
    for key in carried:
        torch.testing.assert_close(saved["model.vision_tower." + key[len("vision_model."):]], tower[key], msg=key)


# --- video: tube masking --------------------------------------------------------------------------------

VIDEO_TINY = ["--data.train_samples=48", "--data.held_out_samples=16", "--data.batch_size=16",
              "--model.video.patch_size=8", "--model.video.width=32", "--model.video.layers=1",
              "--model.video.heads=2", "--model.mask_ratio=0.75", "--model.decoder_width=16",
              "--model.decoder_layers=1", "--model.decoder_heads=2", "--train.steps=2", "--train.eval_every=2",
              "--train.checkpoint_every=2", "--train.log_every=1", "--optim.warmup_steps=1"]


def _video_model():
    torch.manual_seed(0)
    video = VideoConfig(image_size=16, patch_size=4, frames=4, tubelet_size=2, width=32, layers=1, heads=2,
                        final_norm=True, mean=MEAN, std=STD)
    return VideoMaskedAutoencoder(VideoMaeConfig(video=video, mask_ratio=0.75, decoder_width=16, decoder_layers=1,
                                                 decoder_heads=2)).eval()


def test_tube_masking_hides_the_same_places_in_every_time_step_and_the_encoder_never_sees_them():
    model = _video_model()
    keep = model.config.draw_keep(2, torch.Generator().manual_seed(0))
    assert keep.shape == (2, 8) and model.num_patches == 32  # 2 time steps x 16 places, 4 places kept
    places = keep % 16
    torch.testing.assert_close(places[:, :4], places[:, 4:])
    assert (keep[:, :4] < 16).all() and (keep[:, 4:] >= 16).all()
    frames = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    changed = frames.clone()
    for sample in range(2):
        for place in set(range(16)) - set(places[sample].tolist()):
            row, column = divmod(place, 4)
            changed[sample, :, row * 4:(row + 1) * 4, column * 4:(column + 1) * 4] = 0
    with torch.no_grad():
        torch.testing.assert_close(model.encode_visible(changed, keep), model.encode_visible(frames, keep))
    # the targets are the tubelets the embedding projects, in its order
    embeddings = model.video_model.embeddings
    tokens = patch_embed(frames, embeddings.projection.weight, channels_last=True, mean=MEAN, std=STD,
                         backend="reference")
    by_hand = model.patch_targets(frames) @ embeddings.projection.weight.flatten(1).T
    torch.testing.assert_close(by_hand, tokens, rtol=1e-4, atol=1e-4)
    output = model(frames, keep)
    assert int(output["hidden"].sum()) == 2 * 24 and output["loss"].item() > 0


def _assert_tower_carries_over(root, pretrained: str, media: str, recipe: str, tower_overrides, wrong_override: str,
                               refusal: str) -> None:
    """A contrastive run of `recipe` with train.init_from the `pretrained` run (its tower frozen, so the
    weights it saves are the ones it started from) holds that run's `<media>_model.*` weights; a tower of
    another shape (`wrong_override`) is refused with `refusal`."""
    tower = {key: value for key, value in torch.load(root / pretrained / "model.pt", weights_only=False)[
        "state_dict"].items() if key.startswith(f"{media}_model.")}
    assert tower
    overrides = [*tower_overrides, "--model.text.width=32", "--model.text.layers=1", "--model.text.heads=2",
                 "--model.embed_dim=16", "--data.train_samples=48", "--data.held_out_samples=16",
                 "--data.batch_size=16", "--train.steps=1", "--train.eval_every=1", "--train.checkpoint_every=1",
                 "--train.trainable=[text_model,text_projection]", f"--data.synth_dir={root / 'synth'}",
                 f"--train.init_from={root / pretrained}"]
    contrastive = load_config(recipe, overrides)
    contrastive.run_dir = str(root / f"{media}-contrastive")
    train(contrastive, progress=False)
    saved = torch.load(root / f"{media}-contrastive" / "model.pt", weights_only=False)["state_dict"]
    for key, value in tower.items():
        torch.testing.assert_close(saved[key], value, msg=key)
    wrong = load_config(recipe, [*overrides, wrong_override])
    wrong.run_dir = str(root / "wrong")
    with pytest.raises(ValueError, match=refusal):
        train(wrong, progress=False)


def videomae_config(root, name, *extra):
    config = load_config("videomae-tiny", [*VIDEO_TINY, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def test_a_videomae_run_probes_direction_loads_and_hands_its_tower_to_a_video_clip(tmp_path):
    result = train(videomae_config(tmp_path, "videomae"), progress=False)
    assert {"held_out_loss", "probe_accuracy", "other_probe_accuracy", "random_probe_accuracy"} <= result.keys()
    model, preprocess = mmfast.load(str(tmp_path / "videomae"))
    clip = preprocess(np.zeros((13, 20, 24, 3), dtype=np.uint8))  # any length and size
    assert clip.shape == (8, 32, 32, 3) and model.features(clip[None]).shape == (1, 32)
    _assert_tower_carries_over(tmp_path, "videomae", "video", "video-clip-tiny", [  # VideoMAE's tubelets, no overlap
        "--model.video.patch_size=8", "--model.video.patch_stride=null", "--model.video.tubelet_size=2",
        "--model.video.width=32", "--model.video.layers=1", "--model.video.heads=2"],
        "--model.video.width=48", r"video tower does not fit model.video: width 32 \(the model's: 48\)")

# --- audio: spectrogram patches -------------------------------------------------------------------------

AUDIO_TOWER = ["--model.audio.num_mel_bins=32", "--model.audio.max_length=48", "--model.audio.patch_size=8",
               "--model.audio.frequency_stride=8", "--model.audio.time_stride=8", "--model.audio.width=32",
               "--model.audio.layers=1", "--model.audio.heads=2"]


def test_audio_targets_are_the_spectrogram_patches_the_encoder_embeds():
    torch.manual_seed(0)
    audio = AudioConfig(num_mel_bins=32, max_length=40, patch_size=8, frequency_stride=8, time_stride=8, width=32,
                        layers=1, heads=2)
    model = AudioMaskedAutoencoder(AudioMaeConfig(audio=audio, decoder_width=16, decoder_layers=1,
                                                  decoder_heads=2)).eval()
    assert (model.num_patches, model.num_kept) == (20, 3)  # 4 frequency x 5 time patches, 80 % hidden
    waveforms = torch.randn(2, 6400, generator=torch.Generator().manual_seed(1))
    spectrogram = model.audio_model.features(waveforms)
    projection = model.audio_model.embeddings.patch_embeddings.projection
    tokens = patch_embed(spectrogram.unsqueeze(1).transpose(2, 3), projection.weight, stride=8, backend="reference")
    torch.testing.assert_close(model.patch_targets(waveforms) @ projection.weight.flatten(1).T, tokens,
                               rtol=1e-4, atol=1e-4)
    keep = model.config.draw_keep(2, torch.Generator().manual_seed(2))
    output = model(waveforms, keep)
    assert int(output["hidden"].sum()) == 2 * 17 and output["loss"].item() > 0
    with pytest.raises(ValueError, match="mask_ratio must leave at least one patch visible and one hidden of the 20"):
        AudioMaeConfig(audio=audio, mask_ratio=0.99)


def test_an_audiomae_run_probes_count_and_pitch_and_hands_its_tower_to_a_clap(tmp_path):
    config = load_config("audiomae-tiny", ["--data.train_samples=48", "--data.held_out_samples=16",
                                           "--data.batch_size=16", *AUDIO_TOWER, "--model.decoder_width=16",
                                           "--model.decoder_layers=1", "--model.decoder_heads=2", "--train.steps=2",
                                           "--train.eval_every=2", "--train.checkpoint_every=2",
                                           f"--data.synth_dir={tmp_path / 'synth'}"])
    config.run_dir = str(tmp_path / "audiomae")
    result = train(config, progress=False)
    assert {"held_out_loss", "probe_accuracy", "other_probe_accuracy", "random_probe_accuracy"} <= result.keys()
    model, preprocess = mmfast.load(str(tmp_path / "audiomae"))
    waveform = preprocess((np.zeros(22050, dtype=np.float32), 44100))  # any rate: resampled to 16 kHz
    assert model.features(waveform[None]).shape == (1, 32)
    _assert_tower_carries_over(tmp_path, "audiomae", "audio", "clap-tiny", AUDIO_TOWER, "--model.audio.time_stride=4",
                               r"audio tower does not fit model.audio: time_stride 8 \(the model's: 4\)")
