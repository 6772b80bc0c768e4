"""The bundled audio and video clips: deterministic, attributes true to the signal (beeps counted from
the loudness, their pitch from the spectrum, a square wave's third harmonic, for the beeps made another
way too; the shape's centre moving the named way, its color dominating), shards written and read back."""
import io
import json
import tarfile

import numpy as np
import pytest

from mmfast.data import synth
from mmfast.data.synth_media import (DIRECTIONS, PITCHES, media_clip, other_beep_clip, other_beeps, read_wav,
                                     write_media_shards)


def _beeps(waveform: np.ndarray, rate: int) -> int:
    """Beeps counted as runs of loud 10 ms frames (their loudness smoothed over 30 ms)."""
    frames = waveform[: len(waveform) // 160 * 160].reshape(-1, 160)
    loud = np.convolve(np.sqrt((frames ** 2).mean(1)), np.ones(3) / 3, mode="same") > 0.1
    return int((loud[1:] & ~loud[:-1]).sum() + loud[0])


def test_clips_are_deterministic_and_splits_differ():
    for modality in ("audio", "video"):
        first, again = media_clip(modality, 3, "train", 0), media_clip(modality, 3, "train", 0)
        assert np.array_equal(first.data, again.data) and first.caption == again.caption
        assert not np.array_equal(first.data, media_clip(modality, 3, "held_out", 0).data)


def _clips():
    """The generator's clips, then those made another way (evaluation only)."""
    yield from (media_clip("audio", index, "train", 0) for index in range(40))
    yield from (other_beep_clip(np.random.default_rng([0, 7, index])) for index in range(40))
    waveforms, metas = other_beeps(3)  # the evaluation set is those clips
    assert np.array_equal(waveforms[2], other_beep_clip(np.random.default_rng([0, 7, 2])).data)


def test_beeps_are_what_the_caption_says():
    for index, clip in enumerate(_clips()):
        meta, waveform = clip.meta, clip.data
        assert waveform.shape == (16000,) and waveform.dtype == np.float32
        assert _beeps(waveform, 16000) == meta["count"], (index, clip.caption)
        start, length = int(meta["starts"][0] * 16000), int(meta["durations"][0] * 16000)
        spectrum = np.abs(np.fft.rfft(waveform[start:start + length], n=16000))
        peak = spectrum.argmax()
        low, high = PITCHES[meta["pitch"]]
        assert low - 10 <= peak <= high + 10, (index, peak, meta["pitch"])
        third = spectrum[3 * peak - 5:3 * peak + 6].max() / spectrum[peak]
        assert (third > 0.2) == (meta["wave"] == "square"), (index, third, meta["wave"])
        assert meta["pitch"] in clip.caption and ("beeps" in clip.caption) == (meta["count"] > 1)


def test_the_shape_moves_the_named_way_in_its_color():
    for index in range(40):
        clip = media_clip("video", index, "train", 0)
        video, meta = clip.data.astype(np.float64), clip.meta
        assert clip.data.shape == (8, 32, 32, 3) and clip.data.dtype == np.uint8
        target = np.array(synth.COLORS[meta["color"]], dtype=np.float64)
        near = np.linalg.norm(video - target, axis=-1) < 80  # pixels of the shape's color family
        ys, xs = np.mgrid[0:32, 0:32]
        centres = [((xs * mask).sum() / mask.sum(), (ys * mask).sum() / mask.sum()) for mask in near]
        moved = np.array(centres[-1]) - np.array(centres[0])
        dx, dy = DIRECTIONS[meta["direction"]]
        assert moved @ np.array([dx, dy]) > 5, (index, moved, meta["direction"])  # pixels along the direction
        assert clip.caption == f"{'an' if meta['color'][0] in 'aeiou' else 'a'} {meta['color']} {meta['shape']} " \
                               f"moving {meta['direction']}"


def test_shards_are_written_and_read_back(tmp_path):
    pytest.importorskip("webdataset")
    written = write_media_shards(str(tmp_path / "audio"), "audio", train=5, held_out=2, shard_size=3, progress=False)
    assert [len(paths) for paths in written.values()] == [2, 1]
    with tarfile.open(written["train"][0]) as tar:
        names = sorted(tar.getnames())
        assert names[:3] == ["train-00000000.json", "train-00000000.txt", "train-00000000.wav"]
        waveform, rate = read_wav(tar.extractfile("train-00000000.wav").read())
        meta = json.loads(tar.extractfile("train-00000000.json").read())
    clip = media_clip("audio", 0, "train", 0)
    assert rate == 16000 and meta == json.loads(json.dumps(clip.meta))
    assert np.abs(waveform - clip.data).max() < 1 / 32767 + 1e-6
    written = write_media_shards(str(tmp_path / "video"), "video", train=2, held_out=1, progress=False)
    with tarfile.open(written["held_out"][0]) as tar:
        frames = np.load(io.BytesIO(tar.extractfile("held_out-00000000.npy").read()))
    assert np.array_equal(frames, media_clip("video", 0, "held_out", 0).data)
    with pytest.raises(ValueError, match="modality must be one of"):
        write_media_shards(str(tmp_path / "x"), "smell", progress=False)


def test_cli_writes_audio_and_video_shards(tmp_path, capsys):
    pytest.importorskip("webdataset")
    from mmfast.cli import main

    for modality in ("audio", "video"):
        assert main(["data", "synth", "--modality", modality, "--out", str(tmp_path / modality), "--train", "3",
                     "--held-out", "1"]) == 0
        assert sorted(p.name for p in (tmp_path / modality).iterdir()) == ["held_out-000000.tar", "train-000000.tar"]
    assert "train: 1 shard(s)" in capsys.readouterr().out
