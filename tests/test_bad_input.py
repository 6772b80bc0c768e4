"""Bad input as a careless or hostile user gives it: the ops raise clear errors (argument, expected, got)
or return what the other backends return, never memory a kernel did not write; the data readers skip
and count one bad sample instead of stopping the run."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.ops import log_mel_spectrogram, mixed_attention, patch_embed

BACKENDS = ["triton", "reference"]


# -- mixed attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_seqlen", [10, 0, -1, 4.5, True])
def test_mixed_attention_refuses_a_max_seqlen_that_would_leave_rows_unwritten(max_seqlen):
    q = torch.randn(110, 2, 32)
    cu_seqlens = torch.tensor([0, 10, 110], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen must be"):
        mixed_attention(q, q, q, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_attention_with_no_tokens_returns_empty(backend):
    padded = torch.randn(2, 0, 2, 32)
    out, lse = mixed_attention(padded, padded, padded, return_lse=True, backend=backend)
    assert out.shape == (2, 0, 2, 32) and lse.shape == (2, 2, 0)
    packed = torch.randn(0, 2, 32)
    out = mixed_attention(packed, packed, packed, cu_seqlens=torch.zeros(2, dtype=torch.int32), backend=backend)
    assert out.shape == (0, 2, 32)


# -- log-mel --------------------------------------------------------------------------------------
def _backends_with_extension():
    from mmfast.ops.log_mel import cuda as extension

    return BACKENDS + (["cuda"] if extension.available(compile=True) else [])


def test_log_mel_propagates_nan_and_inf_on_every_backend():
    waveform = torch.randn(3, 3200)
    waveform[0, 1000] = float("nan")
    waveform[1, 2000] = float("inf")
    results = {backend: log_mel_spectrogram(waveform, backend=backend) for backend in _backends_with_extension()}
    reference = results["reference"]
    assert reference[0].isnan().any() and reference[1].isnan().any() and not reference[2].isnan().any()
    for backend, result in results.items():
        assert torch.equal(result.isnan(), reference.isnan()), backend
        # whisper's normalization then spreads a clip's NaN peak over that clip, on every backend alike
        normalized = log_mel_spectrogram(waveform, normalize="whisper", backend=backend)
        assert normalized[0].isnan().all() and not normalized[2].isnan().any(), backend


@pytest.mark.parametrize("arguments, message", [
    (dict(win_length=0), "win_length must be an int >= 1, got 0"),
    (dict(window=torch.hann_window(500)), r"window must be \[win_length\] = \[400\], got \(500,\)"),
    (dict(window=torch.hann_window(400, device="meta")), "window must be on the waveform's device"),
    (dict(filters=torch.zeros(201, 80, device="meta")), "filters must be on the waveform's device"),
    (dict(filters=torch.zeros(200, 80)), r"filters must be \[n_fft // 2 \+ 1, n_mels\]"),
    (dict(lengths=torch.tensor([100, -5])), "lengths must be >= 0"),
    (dict(lengths=torch.tensor([100.0, 5.0])), r"lengths must be \[2\] integers"),
])
def test_log_mel_argument_errors(arguments, message):
    with pytest.raises((ValueError, TypeError), match=message):
        log_mel_spectrogram(torch.randn(2, 1600), **arguments)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_mel_of_no_clips_is_empty(backend):
    out, mask = log_mel_spectrogram(torch.randn(0, 1600), backend=backend, return_frame_mask=True)
    assert out.shape == (0, 80, 11) and out.dtype == torch.float32 and mask.shape == (0, 11)


def test_extension_refuses_a_meta_window():
    from mmfast.ops.log_mel import cuda as extension

    if not extension.available(compile=True):
        pytest.skip("the C++ extension is not built")
    waveform = torch.randn(1, 1600)
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.mmfast.log_mel(waveform, torch.ones(400, device="meta"), torch.zeros(201, 80), 400, 160, True, True,
                                 2.0, 1, 1e-10)


def test_whisper_feature_extractor_refuses_no_audio():
    from mmfast.audio import WhisperFeatureExtractor

    with pytest.raises(ValueError, match="raw_speech is empty"):
        WhisperFeatureExtractor()([])


# -- patch embedding ------------------------------------------------------------------------------
@pytest.mark.parametrize("arguments, message", [
    (dict(std=(0.5, 0.0, 0.5)), r"std must be > 0 for every channel, got \[0.5, 0.0, 0.5\]"),
    (dict(bias=torch.zeros(8, device="meta")), "bias must be a float tensor on the weight's device"),
    (dict(stride=2.7), "stride must be a positive int or 2 positive ints, got 2.7"),
    (dict(stride=(16, 0)), "stride must be a positive int"),
    (dict(mean="abc"), "mean must be a number, a sequence of numbers or a tensor, got 'abc'"),
    (dict(mean=torch.zeros(3, device="meta")), "mean must be on the CPU"),
])
def test_patch_embed_argument_errors(arguments, message):
    pixels = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises((ValueError, TypeError), match=message):
        patch_embed(pixels, torch.randn(8, 3, 16, 16), **arguments)


def test_patch_embed_takes_numpy_numbers():
    pixels = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
    weight = torch.randn(8, 3, 16, 16)
    expected = patch_embed(pixels, weight, stride=16, mean=(0.5, 0.5, 0.5), backend="reference")
    ours = patch_embed(pixels, weight, stride=np.int64(16), mean=np.full(3, 0.5), backend="reference")
    torch.testing.assert_close(ours, expected)


# -- data readers ---------------------------------------------------------------------------------
webdataset = pytest.importorskip("webdataset")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path, samples):
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def test_one_bad_sample_is_skipped_and_counted(tmp_path):
    from mmfast.data import ShardPairs

    path = _shard(tmp_path / "bad.tar", [
        {"__key__": "a", "png": _png(), "txt": "fine"},
        {"__key__": "b", "png": _png(), "txt": b"caf\xe9 latin-1"},
        {"__key__": "c", "png": _png(), "txt": "bad sidecar", "json": b"{not json"},
        {"__key__": "d", "png": _png(), "txt": "fine too", "json": json.dumps({"k": 1})},
    ])
    dataset = ShardPairs(path)
    assert [caption for _, caption, _ in dataset] == ["fine", "fine too"]
    assert dataset.problems == {"caption not UTF-8": 1, "malformed .json": 1}


def test_a_truncated_shard_is_reported_with_its_name_and_count(tmp_path):
    from mmfast.data import ShardPairs
    from mmfast.data.stream import sample_captions

    path = _shard(tmp_path / "cut.tar", [{"__key__": f"{i:03d}", "png": _png(), "txt": f"caption {i}"}
                                         for i in range(10)])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    dataset = ShardPairs(path)
    read = list(dataset)
    assert 0 < len(read) < 10
    [(reason, count)] = dataset.problems.items()
    assert reason.startswith("truncated shard cut.tar") and reason.endswith(f"after {len(read)} samples")
    assert count == 1
    assert sample_captions([path], 100) == [f"caption {i}" for i in range(len(read))]


def test_file_rows_without_caption_malformed_jsonl_and_non_utf8_are_skipped(tmp_path):
    from mmfast.data import FilePairs

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "pairs.csv").write_bytes(b"filepath,title\nok.png,a square\nok.png\nok.png,caf\xe9\nok.png,fine\n")
    dataset = FilePairs(str(tmp_path / "pairs.csv"))
    assert [caption for _, caption in dataset.valid()] == ["a square", "fine"]
    assert dataset.problems == {"row without image path or caption": 1, "not UTF-8": 1}
    lines = ['{"filepath": "ok.png", "title": "one"}', '{"filepath": "ok.png", "title": ', '{"filepath": "ok.png"}',
             '{"filepath": "ok.png", "title": "two"}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    dataset = FilePairs(str(tmp_path / "pairs.jsonl"))
    assert [caption for _, caption in dataset.valid()] == ["one", "two"]
    assert dataset.problems == {"malformed JSONL line (first: pairs.jsonl line 2)": 1,
                                "row without image path or caption": 1}


def test_shard_patterns_expand_braces_as_webdataset_does(tmp_path):
    from mmfast.data.splits import expand_shards

    for index in range(3):
        _shard(tmp_path / f"{index:05d}.tar", [{"__key__": "a", "png": _png(), "txt": "x"}])
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "0000[01].tar") + "::" + str(tmp_path / "00002.tar")) == [
        str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    with pytest.raises(ValueError, match="00003.tar' of .* does not exist"):
        expand_shards(str(tmp_path / "{00000..00003}.tar"))


def test_a_missing_optional_package_names_the_extra(monkeypatch):
    import importlib.util

    from mmfast.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "webdataset"
                        else find_spec(name, *rest))
    with pytest.raises(SystemExit, match=r"mmfast train: needs webdataset, not installed: pip install 'mmfast\[train\]'"):
        main(["train", "--recipe", "clip-tiny"])
    with pytest.raises(SystemExit, match=r"pip install 'mmfast\[data\]'"):
        main(["data", "synth"])
