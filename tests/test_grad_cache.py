"""Gradient caching gives the one-shot batch's gradients, with dropout masks replayed."""
import pytest
import torch

import mmfast
import mmfast.models
from mmfast.train import grad_cache_step


def _model_and_batch(seed, dropout=False):
    torch.manual_seed(seed)
    model = mmfast.models.CLIP(mmfast.models.clip_config("tiny", init_logit_bias=-5.0))
    if dropout:  # a stochastic layer inside both towers: step 3 must replay step 1's masks
        model.visual_projection = torch.nn.Sequential(torch.nn.Dropout(0.3), model.visual_projection)
        model.text_projection = torch.nn.Sequential(torch.nn.Dropout(0.3), model.text_projection)
    pixels = torch.randn(12, 3, 32, 32)
    tokens = torch.randint(1, 998, (12, 16))
    tokens[:, -1] = 999
    return model, pixels, tokens


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_gradients_equal_the_one_shot_batch(loss_name):
    model, pixels, tokens = _model_and_batch(0)
    loss_fn = mmfast.nn.ClipLoss() if loss_name == "clip" else mmfast.nn.SigLipLoss()
    extra = [model.logit_bias]  # ClipLoss takes it too (it cancels in the softmax)
    one_shot = loss_fn(model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True),
                       model.logit_scale.exp(), *extra)
    one_shot.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    cached = grad_cache_step(model, loss_fn, pixels, tokens, micro_batch=5)
    torch.testing.assert_close(cached, one_shot.detach())
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_masks_are_replayed():
    """One micro-batch draws its dropout masks in the one-shot order: the gradients match only if the
    second encoding replays the first one's masks."""
    model, pixels, tokens = _model_and_batch(1, dropout=True)
    loss_fn = mmfast.nn.ClipLoss()
    torch.manual_seed(7)
    loss_fn(model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True),
            model.logit_scale.exp(), model.logit_bias).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(7)
    grad_cache_step(model, loss_fn, pixels, tokens, micro_batch=12)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        grad_cache_step(model, loss_fn, pixels, tokens, micro_batch=0)
