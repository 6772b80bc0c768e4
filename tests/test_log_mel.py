"""mmfast.ops.log_mel_spectrogram against a float64 reference, librosa, HF's WhisperFeatureExtractor
(numpy path) and whisper's formula; the drop-ins; edge cases; gradients; bad inputs."""
import os

import numpy as np
import pytest
import torch

import mmfast
from mmfast.audio import WhisperFeatureExtractor, whisper_log_mel
from tests.conftest import DEVICE

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
BACKENDS = ["triton", "native", "reference"]  # "native": the csrc extension (C++ on CPU tensors)
librosa = pytest.importorskip("librosa")


def waves(batch, samples, seed=0, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, samples, generator=generator) * scale).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("settings", [
    pytest.param(dict(), id="whisper-16k-80"),
    pytest.param(dict(n_mels=128), id="16k-128"),
    pytest.param(dict(sample_rate=8000, n_fft=256, hop_length=80, n_mels=40, mel_scale="htk", mel_norm=None),
                 id="8k-htk"),
    pytest.param(dict(sample_rate=44100, n_fft=2048, hop_length=512, n_mels=128, win_length=1500),
                 id="44k-win1500"),
    pytest.param(dict(center=False, log="ln", power=1.0), id="no-center-ln-magnitude"),
    pytest.param(dict(pad_mode="constant", normalize="whisper"), id="constant-pad-whisper"),
])
def test_matches_float64_reference(settings, backend):
    wave = waves(2, 4801)
    ours = mmfast.ops.log_mel_spectrogram(wave, backend=backend, **settings)
    exact = mmfast.ops.log_mel_spectrogram(wave.double(), backend="reference", **settings)
    assert ours.dtype == torch.float32 and ours.shape == exact.shape
    assert (ours.double() - exact).abs().max().item() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("samples", [1, 100, 399, 1600, 1601], ids=lambda s: f"T{s}")
def test_short_and_exact_lengths(samples, backend):
    """Clips shorter than n_fft (reflection repeats, as numpy's pad does), length 1, exact hops."""
    wave = waves(1, samples, seed=samples)
    ours = mmfast.ops.log_mel_spectrogram(wave, backend=backend)
    assert ours.shape == (1, 80, 1 + samples // 160)
    padded = np.pad(wave[0].double().cpu().numpy(), 200, mode="reflect")
    expected = librosa.feature.melspectrogram(y=padded, sr=16000, n_fft=400, hop_length=160, n_mels=80,
                                              center=False, htk=False, norm="slaney")
    np.testing.assert_allclose(ours[0].cpu().numpy(), np.log10(np.maximum(expected, 1e-10)), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("htk", [False, True], ids=["slaney", "htk"])
def test_parity_with_librosa(htk, backend):
    wave = waves(1, 8000, seed=3)
    norm = None if htk else "slaney"
    ours = mmfast.ops.log_mel_spectrogram(wave, mel_scale="htk" if htk else "slaney", mel_norm=norm, log=None,
                                          clamp_min=None, n_mels=64, backend=backend)
    expected = librosa.feature.melspectrogram(y=wave[0].double().cpu().numpy(), sr=16000, n_fft=400, hop_length=160,
                                              n_mels=64, htk=htk, norm=norm, pad_mode="reflect")
    np.testing.assert_allclose(ours[0].cpu().numpy(), expected, rtol=1e-4, atol=1e-6 * expected.max())
    filters = mmfast.ops.log_mel.mel_filters(n_mels=64, mel_scale="htk" if htk else "slaney", mel_norm=norm)
    np.testing.assert_allclose(filters.T.numpy(), librosa.filters.mel(sr=16000, n_fft=400, n_mels=64, htk=htk,
                                                                      norm=norm), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float32_front_end_inside_bf16_autocast(backend):
    """A model trained in bf16 calls the front end inside autocast: it stays float32 and unchanged (the
    native kernel once met autocast's bf16 inside and failed)."""
    wave = waves(2, 1600, seed=3)
    plain = mmfast.ops.log_mel_spectrogram(wave, backend=backend)
    with torch.autocast(wave.device.type, dtype=torch.bfloat16):
        inside = mmfast.ops.log_mel_spectrogram(wave, backend=backend)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_silence_is_clamped(backend):
    out = mmfast.ops.log_mel_spectrogram(torch.zeros(2, 3200, device=DEVICE), normalize="whisper", backend=backend)
    torch.testing.assert_close(out, torch.full_like(out, (-10.0 + 4.0) / 4.0))


def test_lengths_mask_frames_and_keep_padding_out_of_the_peak():
    wave = waves(2, 3200, seed=4)
    wave[1, 1600:] = 0.0
    wave[1, 2000:] = 5.0  # loud samples past clip 1's end must not set its peak
    out, mask = mmfast.ops.log_mel_spectrogram(wave, normalize="whisper", lengths=torch.tensor([3200, 1600]),
                                               return_frame_mask=True, backend="reference")
    assert mask.tolist() == [[True] * 20 + [False], [True] * 10 + [False] * 11]  # frame t starts at t * hop
    raw = mmfast.ops.log_mel_spectrogram(wave[1:], backend="reference")[0]
    peak = raw[:, :10].max()
    torch.testing.assert_close(out[1], (torch.maximum(raw, peak - 8.0) + 4.0) / 4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_with_respect_to_the_waveform(backend):
    wave = waves(2, 1200, seed=5).double().requires_grad_()
    wave32 = wave.detach().float().requires_grad_()
    upstream = torch.randn(2, 80, 8, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ours = mmfast.ops.log_mel_spectrogram(wave32, normalize="whisper", backend=backend)
    (grad,) = torch.autograd.grad(ours, wave32, upstream)
    exact = mmfast.ops.log_mel_spectrogram(wave, normalize="whisper", backend="reference")
    (exact_grad,) = torch.autograd.grad(exact, wave, upstream.double())
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-3, atol=1e-3 * exact_grad.abs().max().item())


# --- drop-ins ---------------------------------------------------------------------------------


def _whisper_formula(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """openai-whisper's log_mel_spectrogram, written out (whisper is not a dependency)."""
    stft = torch.stft(audio, 400, 160, window=torch.hann_window(400, dtype=audio.dtype), return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)).to(audio.dtype)
    log_spec = torch.clamp(filters @ magnitudes, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_matches_whisper(n_mels, backend):
    audio = waves(2, 16000, seed=7).cpu().double()
    expected = _whisper_formula(audio, n_mels)
    ours = whisper_log_mel(audio.float(), n_mels=n_mels, device=DEVICE, backend=backend)
    assert ours.shape == expected.shape == (2, n_mels, 100)
    assert (ours.cpu().double() - expected).abs().max().item() < 1e-3
    single = whisper_log_mel(audio[0].float().numpy(), n_mels=n_mels, padding=160, backend=backend)
    assert single.shape == (n_mels, 101)


def test_feature_extractor_matches_hf_numpy_path():
    transformers = pytest.importorskip("transformers")
    hf = transformers.WhisperFeatureExtractor(feature_size=80)
    ours = WhisperFeatureExtractor(feature_size=80)
    rng = np.random.default_rng(8)
    speech = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 24000, 5000)]
    expected = hf(speech, sampling_rate=16000, return_tensors="np", return_attention_mask=True)
    got = ours(speech, sampling_rate=16000, return_tensors="np", return_attention_mask=True)
    assert got["input_features"].shape == expected["input_features"].shape == (3, 80, 3000)
    np.testing.assert_allclose(got["input_features"], expected["input_features"], atol=1e-3)
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
    with pytest.raises(ValueError, match="expects sampling_rate=16000, got 8000"):
        ours(speech, sampling_rate=8000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mel_spectrogram_module_matches_torchaudio_defaults(backend):
    """torchaudio's MelSpectrogram defaults (htk, no norm, power 2, no log, n_mels 128 with empty
    filters warned about), checked against librosa with the same settings."""
    with pytest.warns(UserWarning, match="are all zero"):
        module = mmfast.nn.MelSpectrogram(sample_rate=16000, n_mels=128, backend=backend)
    wave = waves(3, 4000, seed=9).reshape(3, 1, 4000)
    out = module(wave)
    assert out.shape == (3, 1, 128, 21)
    expected = librosa.feature.melspectrogram(y=wave[1, 0].double().cpu().numpy(), sr=16000, n_fft=400,
                                              hop_length=200, n_mels=128, htk=True, norm=None, pad_mode="reflect")
    np.testing.assert_allclose(out[1, 0].cpu().numpy(), expected, rtol=1e-4, atol=1e-6 * expected.max())


@pytest.mark.cuda
def test_torchaudio_parity_on_gpu():
    torchaudio = pytest.importorskip("torchaudio")
    wave = torch.randn(4, 16000 * 5, device="cuda") * 0.1
    theirs = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, n_mels=80,
                                                  norm="slaney", mel_scale="slaney").cuda()(wave)
    ours = mmfast.ops.log_mel_spectrogram(wave, log=None, clamp_min=None)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.max().item())


@pytest.mark.cuda
def test_whisper_target_tolerance_on_gpu():
    wave = torch.randn(64, 16000 * 30, device="cuda") * 0.1
    ours = mmfast.ops.log_mel_spectrogram(wave, normalize="whisper")
    exact = mmfast.ops.log_mel_spectrogram(wave.double(), normalize="whisper", backend="reference")
    assert (ours.double() - exact).abs().max().item() <= 1e-3


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    call = mmfast.ops.log_mel_spectrogram
    wave = torch.randn(2, 1000)
    with pytest.raises(ValueError, match=r"waveform must be \[T\] or \[B, T\], got shape \(1, 2, 1000\)"):
        call(wave[None])
    with pytest.raises(TypeError, match="waveform must be a float tensor, got torch.int16"):
        call(wave.to(torch.int16))
    with pytest.raises(ValueError, match="n_mels=80 is too large for n_fft=64"):
        call(wave, n_fft=64, hop_length=16)
    with pytest.raises(ValueError, match="f_max must be at most the Nyquist frequency 8000.0, got 9000"):
        call(wave, f_max=9000)
    with pytest.raises(ValueError, match="hop_length must be an int >= 1, got 0"):
        call(wave, hop_length=0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        call(wave, normalize="max")
    with pytest.raises(ValueError, match=r"lengths must be \[2\]"):
        call(wave, lengths=torch.tensor([1000]))


# --- the csrc extension ----------------------------------------------------------------------


def test_extension_op_passes_opcheck():
    from mmfast.ops.log_mel import cuda as extension

    assert extension.available(compile=True), "the C++ extension did not build"
    wave = waves(2, 1601, seed=10)
    window = torch.hann_window(400, device=DEVICE)
    filters = mmfast.ops.log_mel.mel_filters().float().to(DEVICE)
    for settings in ((True, True, 2.0, 1, 1e-10), (False, False, 1.0, 0, None), (True, False, 2.0, 2, 1e-5)):
        torch.library.opcheck(torch.ops.mmfast.log_mel.default, (wave, window, filters, 400, 160, *settings))
    with pytest.raises(RuntimeError, match=r"filters must be float32 \[n_fft / 2 \+ 1 = 201, n_mels\]"):
        torch.ops.mmfast.log_mel(wave, window, filters[:100], 400, 160, True, True, 2.0, 1, None)


def test_auto_picks_the_cpu_kernel_once_built(monkeypatch):
    from mmfast.ops._backend import resolve_backend
    from mmfast.ops.log_mel import cuda as extension

    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    assert extension.available(compile=True)
    chosen = resolve_backend("log_mel_spectrogram", None, torch.device("cpu"), ("triton", "native", "reference"),
                             cpu_kernel_ready=extension.available)
    assert chosen == "native"
    # the extension's earlier name is still understood
    wave = waves(1, 1600)
    torch.testing.assert_close(mmfast.ops.log_mel_spectrogram(wave, backend="cuda"),
                               mmfast.ops.log_mel_spectrogram(wave, backend="native"))


def test_cuda_sources_compile_with_nvcc(tmp_path):
    """The CUDA kernel compiles and links for sm_90 wherever nvcc is (it runs under the cuda marker)."""
    import shutil
    import subprocess
    import sys

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    home = next((path for path in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if path and os.path.isdir(path)),
                os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    script = (
        "import glob, os\n"
        "from torch.utils import cpp_extension\n"
        f"sources = sorted(glob.glob('{CSRC}/*.cpp') + glob.glob('{CSRC}/*.cu'))\n"
        "cpp_extension.load(name='mmfast_nvcc_check', sources=sources, extra_include_paths=['" + CSRC + "'],\n"
        "                   is_python_module=False, build_directory=os.environ['BUILD'])\n"
    )
    environment = dict(os.environ, CUDA_HOME=home, TORCH_CUDA_ARCH_LIST="9.0", BUILD=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_whisper_log_mel_takes_a_file_path_as_whisper_does(tmp_path, monkeypatch):
    """A path is decoded by ffmpeg (16 kHz mono, 16-bit), as whisper.audio.load_audio does."""
    import shutil
    import wave

    samples = (np.sin(np.arange(8000) * 0.05) * 12000).astype(np.int16)
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(samples.tobytes())
    if shutil.which("ffmpeg"):
        expected = whisper_log_mel(samples.astype(np.float32) / 32768.0)
        torch.testing.assert_close(whisper_log_mel(str(path)), expected)
        torch.testing.assert_close(whisper_log_mel(path), expected)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs the ffmpeg command"):
        whisper_log_mel(str(path))
