"""mmfast.models.audio: HF ASTModel weights give HF's outputs (hidden states and pooler) from the same
spectrogram; the waveform front end is the fused log-mel with AST's settings, padded or cut to the
model's frames and normalized; bad input is named."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmfast.models.audio import AudioConfig, AudioEncoder, from_hf_ast  # noqa: E402
from mmfast.ops.log_mel import log_mel_spectrogram  # noqa: E402
from tests.hf_weights import nudge  # noqa: E402


def hf_ast(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    num_mel_bins=32, max_length=48)
    model = transformers.ASTModel(config).eval()
    return nudge(model, lambda name: name.endswith("bias") or "token" in name or "position" in name)


def test_hf_weights_give_hf_outputs():
    hf = hf_ast()
    ours = from_hf_ast(hf).eval()
    spectrogram = torch.randn(3, 48, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(spectrogram)
        hidden = ours(input_values=spectrogram)
    assert hidden.shape == expected.last_hidden_state.shape == (3, 2 + 2 * 4, 32)  # (32-16)//10+1 x (48-16)//10+1
    torch.testing.assert_close(hidden, expected.last_hidden_state, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooled(hidden), expected.pooler_output, atol=2e-5, rtol=1e-5)


def test_the_waveform_becomes_asts_normalized_log_mel():
    config = AudioConfig(num_mel_bins=32, max_length=48, width=32, layers=1, heads=2)
    model = AudioEncoder(config).eval()
    seconds = torch.arange(3200) / 16000  # 0.2 s: 21 frames, padded to 48
    waveform = torch.stack([torch.sin(2 * math.pi * 440 * seconds), 0.1 * torch.randn(3200)])
    features = model.features(waveform)
    mel = log_mel_spectrogram(waveform, sample_rate=16000, n_fft=400, hop_length=160, n_mels=32, mel_scale="htk",
                              mel_norm=None, log="ln").transpose(1, 2)
    assert features.shape == (2, 48, 32)
    torch.testing.assert_close(features[:, :21], (mel - config.mean) / (2 * config.std))
    torch.testing.assert_close(features[:, 21:], torch.full_like(features[:, 21:], -config.mean / (2 * config.std)))
    # the 440 Hz tone's energy lies in its mel bin, not in the top bins
    assert features[0, 5].argmax() < 16
    long = torch.randn(1, 16000)  # 1 s: 101 frames, cut to 48
    assert model.features(long).shape == (1, 48, 32)
    with torch.no_grad():
        assert model(waveform).shape == (2, 10, 32)


def _speech_like(samples: int, seed: int) -> torch.Tensor:
    """A tone with a DC offset under noise: what pre-emphasis and the per-frame mean removal change."""
    seconds = torch.arange(samples) / 16000
    noise = torch.randn(samples, generator=torch.Generator().manual_seed(seed))
    return 0.3 + 0.5 * torch.sin(2 * math.pi * (300 + 100 * seed) * seconds) + 0.05 * noise


def test_kaldi_fbank_is_what_hf_ast_feature_extractor_computes():
    from mmfast.audio import kaldi_fbank

    extractor = transformers.ASTFeatureExtractor(num_mel_bins=64, max_length=300, do_normalize=False)
    clips = [_speech_like(samples, seed) for seed, samples in enumerate((16000, 7777))]
    ours = [kaldi_fbank(clip, num_mel_bins=64) for clip in clips]
    assert ours[1].shape == (1 + (7777 - 400) // 160, 64)  # snip_edges: whole frames only
    batched = kaldi_fbank(torch.stack([clips[0][:7777], clips[1]]), num_mel_bins=64)
    torch.testing.assert_close(batched[1], ours[1])
    for clip, mine in zip(clips, ours):
        theirs = extractor(clip.numpy(), sampling_rate=16000, return_tensors="pt")["input_values"][0]
        torch.testing.assert_close(mine, theirs[:len(mine)], atol=2e-3, rtol=1e-4)  # HF's FFT is complex64
    with pytest.raises(ValueError, match="shorter than one frame"):
        kaldi_fbank(torch.zeros(100))


def test_kaldi_fbank_is_torchaudios():
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
    from mmfast.audio import kaldi_fbank

    clip = _speech_like(12345, 3)
    theirs = kaldi.fbank(clip[None], sample_frequency=16000, window_type="hanning", num_mel_bins=128)
    torch.testing.assert_close(kaldi_fbank(clip), theirs, atol=2e-3, rtol=1e-4)


def test_a_converted_ast_gives_hfs_outputs_from_the_waveform():
    """from_hf_ast keeps AST's front end (Kaldi's fbank): the waveform in, HF's feature extractor and model's
    hidden states out; the fused front end (mmfast's default for models trained here) differs from it."""
    hf = hf_ast()
    extractor = transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=48)
    clips = torch.stack([_speech_like(8000, 1), _speech_like(8000, 2)])
    with torch.no_grad():
        expected = hf(extractor(list(clips.numpy()), sampling_rate=16000, return_tensors="pt")["input_values"])
        hidden = from_hf_ast(hf).eval()(clips)
        fused = from_hf_ast(hf, front_end="fused").eval()(clips)
    torch.testing.assert_close(hidden, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    assert (fused - expected.last_hidden_state).abs().max() > 0.1
    with pytest.raises(ValueError, match="front_end must be one of"):
        AudioConfig(front_end="librosa")


def test_clips_of_different_lengths_in_one_batch_never_attend_their_padding():
    torch.manual_seed(0)
    config = AudioConfig(num_mel_bins=32, max_length=48, patch_size=8, frequency_stride=8, time_stride=8, width=32,
                         layers=2, heads=2)
    model = AudioEncoder(config).eval()
    waveform = 0.1 * torch.randn(3, 8000)  # 0.5 s: 48 frames after the cut
    lengths = torch.tensor([8000, 3000, 5000])
    with torch.no_grad():
        hidden = model(waveform, lengths=lengths)
        other_padding = waveform.clone()
        other_padding[1, 3000:], other_padding[2, 5000:] = torch.randn(5000), 1.0
        torch.testing.assert_close(model(other_padding, lengths=lengths), hidden, rtol=0, atol=0)
        # alone, padded with silence: the same states as inside the batch
        alone = torch.cat([waveform[1, :3000], torch.zeros(5000)])[None]
        torch.testing.assert_close(model(alone, lengths=lengths[1:2])[0], hidden[1], atol=1e-5, rtol=1e-5)
        # a clip as long as the batch: the unmasked model's states
        torch.testing.assert_close(hidden[0], model(waveform[:1])[0], atol=1e-5, rtol=1e-5)
    # a 3,000-sample clip has 19 frames (starts below 3,000 at a 160-sample hop): the patches starting at
    # frames 0, 8, 16 of the 6 time places in each of the 4 frequency rows, and the two tokens
    assert model._valid_tokens(lengths).sum(1).tolist() == [2 + 4 * 6, 2 + 4 * 3, 2 + 4 * 4]
    assert hidden[1, ~model._valid_tokens(lengths)[1]].abs().max() == 0
    with pytest.raises(ValueError, match=r"lengths must be \[3\] integers >= 1"):
        model(waveform, lengths=torch.tensor([8000, 0, 5000]))
    with pytest.raises(ValueError, match="lengths .* go with a waveform, without keep"):
        model(input_values=torch.zeros(3, 48, 32), lengths=lengths)


def test_bad_input_is_named():
    model = AudioEncoder(AudioConfig(num_mel_bins=32, max_length=48, width=32, layers=1, heads=2))
    with pytest.raises(ValueError, match="exactly one of waveform and input_values"):
        model()
    with pytest.raises(ValueError, match=r"must be \[B, 48 frames, 32 mel bins\], got \(2, 40, 32\)"):
        model(input_values=torch.zeros(2, 40, 32))
    with pytest.raises(ValueError, match="waveform must be float"):
        model(torch.zeros(2, 100, dtype=torch.int16))
    with pytest.raises(ValueError, match="num_mel_bins must be at least patch_size"):
        AudioConfig(num_mel_bins=8)


def test_ast_default_128_mel_bins_take_waveforms():
    """AST's 128 HTK bins at 25 ms windows: the lowest filters are empty (the op alone refuses them); the
    encoder keeps them at the log floor, as Kaldi's fbank, and every other bin as before."""
    from mmfast.ops.log_mel import log_mel_spectrogram

    waveform = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="n_mels=128 is too large for n_fft=400"):
        log_mel_spectrogram(waveform, n_fft=400, hop_length=160, n_mels=128, mel_scale="htk", mel_norm=None)
    encoder = AudioEncoder(AudioConfig(width=32, layers=1, heads=2))
    features = encoder.features(waveform)
    assert features.shape == (2, 1024, 128) and bool(features.isfinite().all())
    floor = (math.log(1e-10) - encoder.config.mean) / (2 * encoder.config.std)
    assert torch.allclose(features[:, :100, 0], torch.full_like(features[:, :100, 0], floor))  # an empty filter
    assert bool((features[:, :100, 64] > floor + 1).all())  # the others carry the signal
