"""mmfast.models.video: HF VideoMAEModel weights give HF's outputs from the same frames (float, and
uint8 channels-last normalized inside the tubelet embedding); the fixed positions are VideoMAE's;
frame sampling (uniform segments, dense); bad input is named."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmfast.models.video import VideoConfig, VideoEncoder, from_hf_videomae, sample_frames  # noqa: E402
from tests.hf_weights import nudge  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def hf_videomae(mean_pooling: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                         use_mean_pooling=mean_pooling)
    model = transformers.VideoMAEModel(config).eval()
    return nudge(model)


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_hf_weights_give_hf_outputs(mean_pooling):
    hf = hf_videomae(mean_pooling)
    ours = from_hf_videomae(hf).eval()
    frames = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(frames).last_hidden_state
        hidden = ours(frames)
    assert hidden.shape == expected.shape == (2, 2 * 4 * 4, 32)
    torch.testing.assert_close(hidden, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.position_embeddings, hf.embeddings.position_embeddings[0].float())
    # uint8 frames as decoders give them, normalized inside the tubelet embedding
    pixels = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    uint8 = from_hf_videomae(hf, mean=MEAN, std=STD).eval()
    normalized = (pixels.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    with torch.no_grad():
        torch.testing.assert_close(uint8(pixels, channels_last=True),
                                   hf(normalized.permute(0, 1, 4, 2, 3)).last_hidden_state, atol=5e-5, rtol=1e-4)


def test_frame_sampling():
    assert sample_frames(80, 8).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]  # each segment's centre
    generator = torch.Generator().manual_seed(0)
    picked = sample_frames(80, 8, training=True, generator=generator)
    assert all(10 * index <= frame < 10 * (index + 1) for index, frame in enumerate(picked.tolist()))
    assert sample_frames(100, 4, mode="dense", stride=4).tolist() == [43, 47, 51, 55]  # frames 43-55, centred
    assert sample_frames(5, 4, mode="dense", stride=4).tolist() == [0, 4, 4, 4]  # short: the last one repeats
    assert sample_frames(3, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_bad_input_is_named():
    model = VideoEncoder(VideoConfig(image_size=32, patch_size=8, frames=4, width=32, layers=1, heads=2))
    with pytest.raises(ValueError, match=r"expected \[B, 4 frames, ...\], got shape \(2, 6, 3, 32, 32\)"):
        model(torch.zeros(2, 6, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of tubelet_size"):
        VideoConfig(frames=5)
    with pytest.raises(ValueError, match="mode must be 'uniform' or 'dense'"):
        sample_frames(10, 2, mode="random")
