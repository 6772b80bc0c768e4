"""Audio generated left to right (model.audio_ramp, diffusion forcing's per-patch times): the times ramp
from the finished patches to the noise, sampling sweeps every patch from 1 to 0 without going back, and
the training loss counts only the patches that still have something to predict."""
import math

import pytest
import torch

from mmfast.models.unified import UnifiedConfig, ramp_times, value_times
from tests.test_unified import _model, _task


def test_ramp_times_rise_from_the_front_to_the_noise():
    times = ramp_times(torch.tensor([-8.0, 3.0, 24.0]), 25, 8)
    assert (times[0] == 1).all() and (times[2] == 0).all()
    expected = torch.tensor([0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8] + [8] * 13) / 8
    torch.testing.assert_close(times[1], expected)
    config = UnifiedConfig(text=_model().config.text, text_vocab_size=50)
    grown = value_times(config, times)  # one time per patch of 4 frames
    assert grown.shape == (3, 1, 1, 100)
    torch.testing.assert_close(grown[1, 0, 0, 28:32], torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="audio_ramp must be >= 0"):
        UnifiedConfig(text=_model().config.text, text_vocab_size=50, audio_ramp=-1)


def test_sampling_sweeps_each_patch_from_noise_to_clean_once():
    model = _model()
    model.config.audio_ramp = 8
    seen = []
    forward = model.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["audio_times"].clone())
        return forward(*args, **kwargs)

    model.forward = recording
    values = model.generate_values("audio", [torch.tensor([1, 7, 2]), torch.tensor([1, 9, 2])], steps=3, guidance=2.0)
    assert values.shape == (2, 1, 40, 100)
    assert len(seen) == math.ceil((25 - 1 + 8) * 3 / 8)  # the front's path over the steps each patch takes
    times = torch.stack(seen)  # [calls, 4 rows (conditional then unconditional), 25 patches]
    assert (times[0] == 1).all()
    assert (times[1:] <= times[:-1]).all()  # no patch goes back toward noise
    assert (times[:, :, 1:] >= times[:, :, :-1]).all()  # earlier patches are ahead
    torch.testing.assert_close(times[:, :2], times[:, 2:])  # both branches of the guidance at one time
    assert times[-1, 0, 0] == 0 and times[-1, 0, -1] > 0  # the last call still moves the last patch


def test_training_counts_only_the_patches_still_noised(tmp_path):
    task = _task(tmp_path, "--model.audio_ramp=4", "--model.directions={text_to_audio: 1.0}")
    batch = next(task.batches(1, 0))
    model = task.build_model()
    ramp = task._ramp(batch[4])
    assert ((ramp == 0).sum(1) > 0).any() and ((ramp > 0).sum(1) > 0).all()
    clean = ramp == 0
    base = task.loss(model, batch)

    def shifted(*args, **kwargs):  # a wrong velocity where the patches are already clean
        out = forward(*args, **kwargs)
        out["audio"] = out["audio"] + 5.0 * clean[:, :, None]
        return out

    forward, model.forward = model.forward, shifted
    torch.testing.assert_close(task.loss(model, batch), base)
    # and a wrong one where they are not is counted
    clean = ~clean
    assert task.loss(model, batch) > base + 1
