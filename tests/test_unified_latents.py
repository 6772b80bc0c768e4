"""The unified model on the latents of a diffusers AutoencoderKL (model.image_autoencoder): a tiny random
autoencoder built from a config stands in for SD's VAE; the model patches, trains on and generates its
latents (the autoencoder's own encoding, scaled as its config says), and a finished run gives pictures
through the decoder; bad settings are named."""
import numpy as np
import pytest
import torch

import mmfast
from mmfast.data import synth
from mmfast.models.image_autoencoder import autoencoder_geometry, image_codec
from mmfast.models.llama import LlamaConfig
from mmfast.models.unified import SPECIAL_TOKENS, UnifiedConfig
from mmfast.train import load_config, train
from mmfast.train.tasks import build_task
from mmfast.train.unified_eval import model_inputs
from tests.test_unified import TINY

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """An AutoencoderKL of two blocks (2x fewer latents a side, 4 channels), saved as a directory."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                    layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                                    scaling_factor=0.5)
    directory = tmp_path_factory.mktemp("autoencoder")
    model.save_pretrained(directory)
    return str(directory), model.eval()


def test_a_run_trains_and_generates_on_the_autoencoders_latents(tmp_path, autoencoder):
    directory, reference = autoencoder
    assert autoencoder_geometry(directory) == (4, 2)
    config = load_config("unified-tiny", [*TINY, f"--data.synth_dir={tmp_path / 'synth'}",
                                          f"--model.image_autoencoder={directory}"])
    config.run_dir = str(tmp_path / "run")
    result = train(config, progress=False)
    assert 0.0 <= result["text_to_image_color"] <= 1.0

    generator = mmfast.load_unified(config.run_dir)
    model = generator.model
    assert (model.config.image_channels, model.config.image_downsample) == (4, 2)
    assert model.image_in.in_channels == 4
    assert model.config.span_tokens("image") == (32 // 2 // model.config.image_patch) ** 2
    pictures = torch.stack([torch.from_numpy(np.array(synth.generate(0, "held_out", i, 32, 0.0, None).image))
                            for i in range(3)]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():  # the autoencoder's own encoding, shifted and scaled by its config
        expected = reference.encode(pictures.float() / 127.5 - 1.0).latent_dist.mean * 0.5
    torch.testing.assert_close(model_inputs(model, "image", pictures), expected)
    with torch.no_grad():
        decoded = ((reference.decode(expected / 0.5).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(image_codec(model.config, "cpu").decode(expected), decoded)
    # the recipe's keyframe: a clip's middle frame enters as the autoencoder's latents, as an image does
    assert model.config.video_keyframe
    clips = pictures.permute(0, 2, 3, 1)[:, None].expand(-1, model.config.video_frames, -1, -1, -1).contiguous()
    with torch.no_grad():
        frame_tokens = model.span_embeddings("video", clips)[:, :model.config.span_tokens("image")]
        torch.testing.assert_close(frame_tokens, model.span_embeddings("image", expected))
    picture = generator.generate_image("a red circle.", steps=2)
    assert picture.size == (32, 32)
    assert isinstance(generator.generate_text(image=synth.generate(0, "held_out", 0, 32, 0.0, None).image), str)


def test_bad_autoencoder_settings_are_named(tmp_path, autoencoder):
    with pytest.raises(FileNotFoundError, match="config.json"):
        autoencoder_geometry(str(tmp_path))
    config = load_config("unified-tiny", [*TINY, f"--model.image_autoencoder={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError, match="model.image_autoencoder"):  # checked before any data is drawn
        build_task(config).check(1)
    text = LlamaConfig(vocab_size=50 + len(SPECIAL_TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2)
    with pytest.raises(ValueError, match="image_autoencoder"):
        UnifiedConfig(text=text, text_vocab_size=50, image_channels=4)
    with pytest.raises(ValueError, match="image_size"):  # 36 pixels are no whole number of 2 x 4 patches
        UnifiedConfig(text=text, text_vocab_size=50, image_size=36, image_patch=4, image_autoencoder=autoencoder[0],
                      image_channels=4, image_downsample=2)
