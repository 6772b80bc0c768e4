"""mmfast.models.speech: HF Whisper encoder weights give HF's outputs from the same features; the
waveform front end is the fused log-mel with Whisper's settings, equal to HF's WhisperFeatureExtractor;
bad input is named."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmfast.models.speech import SpeechConfig, SpeechEncoder, from_hf_whisper  # noqa: E402
from tests.hf_weights import nudge  # noqa: E402


def hf_whisper(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                                        num_mel_bins=80, max_source_positions=50, vocab_size=100, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = transformers.WhisperModel(config).eval()
    return nudge(model)


def test_hf_weights_give_hf_outputs():
    hf = hf_whisper()
    ours = from_hf_whisper(hf).eval()
    features = torch.randn(2, 80, 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf.get_encoder()(features).last_hidden_state
        hidden = ours(input_features=features)
    assert hidden.shape == expected.shape == (2, 50, 32)
    torch.testing.assert_close(hidden, expected, atol=2e-5, rtol=1e-5)


def test_the_waveform_front_end_is_whispers():
    model = SpeechEncoder(SpeechConfig(max_source_positions=50, width=32, layers=1, heads=2))
    rng = np.random.default_rng(2)
    clips = [rng.standard_normal(7000).astype(np.float32) * 0.1, rng.standard_normal(16000).astype(np.float32)]
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=1)  # 1 s: 100 frames
    expected = torch.from_numpy(extractor(clips, sampling_rate=16000, return_tensors="np")["input_features"])
    padded = torch.zeros(2, 16000)
    padded[0, :7000], padded[1] = torch.from_numpy(clips[0]), torch.from_numpy(clips[1])
    features = model.features(padded)
    assert features.shape == expected.shape == (2, 80, 100)
    torch.testing.assert_close(features, expected.float(), atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        assert model(padded[:, :9000]).shape == (2, 50, 32)  # shorter clips are padded with silence


def test_bad_input_is_named():
    model = SpeechEncoder(SpeechConfig(max_source_positions=50, width=32, layers=1, heads=2))
    with pytest.raises(ValueError, match="exactly one of waveform and input_features"):
        model()
    with pytest.raises(ValueError, match=r"must be \[B, 80 mel bins, 100 frames\], got \(1, 80, 90\)"):
        model(input_features=torch.zeros(1, 80, 90))
