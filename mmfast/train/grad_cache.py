"""Gradient caching (GradCache, Gao et al. 2021) for contrastive batches larger than activation memory.

1. Encode every micro-batch without a graph and keep only the features (O(N * D)).
2. Compute the contrastive loss on the whole batch's features (the fused loss keeps this
   O(N * D) too) and backpropagate to the features: the cached gradients.
3. Encode each micro-batch again with a graph and backpropagate features . cached gradient.
The parameter gradients equal those of the one-shot batch; the RNG state of step 1 is replayed
in step 3 so dropout masks match.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


@contextmanager
def _replayed_rng(state):
    """Runs the block from a saved CPU (and current CUDA device) RNG state, then restores the present one."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.random.set_rng_state(state[0])
        if devices:
            torch.cuda.set_rng_state(state[1])
        yield


def _rng_state():
    return torch.random.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def grad_cache_step(model, loss_fn, pixels: torch.Tensor, tokens: torch.Tensor, micro_batch: int, *,
                    forward=None, no_sync=None) -> torch.Tensor:
    """One forward/backward of `loss_fn(image_features, text_features, logit_scale[, logit_bias])` over the
    whole batch, the encoders running `micro_batch` rows at a time. `model` has `encode_image`,
    `encode_text` (normalize=True), `scale()` (and `logit_bias`) as mmfast's CLIP. Gradients are
    accumulated into the parameters' .grad; returns the loss (detached).

    Under DistributedDataParallel pass `forward=ddp_model` (step 3 then runs through its forward,
    both towers at once) and `no_sync=ddp_model.no_sync`: gradients are averaged once, after the
    last micro-batch. The features are cached in float32, so the loss runs in float32 under autocast."""
    if pixels.shape[0] != tokens.shape[0]:
        raise ValueError(f"grad_cache_step: pixels and tokens must have one batch size, got {pixels.shape[0]} "
                         f"and {tokens.shape[0]}")
    if micro_batch < 1:
        raise ValueError(f"grad_cache_step: micro_batch must be >= 1, got {micro_batch}")
    forward = forward or model
    chunks = list(zip(pixels.split(micro_batch), tokens.split(micro_batch)))
    states, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for chunk_pixels, chunk_tokens in chunks:
            states.append(_rng_state())
            image_parts.append(model.encode_image(chunk_pixels, normalize=True))
            text_parts.append(model.encode_text(chunk_tokens, normalize=True))
    image = torch.cat(image_parts).float().requires_grad_()
    text = torch.cat(text_parts).float().requires_grad_()
    extra = [model.logit_bias] if getattr(model, "logit_bias", None) is not None else []
    loss = loss_fn(image, text, model.scale(), *extra)
    loss.backward()  # scale/bias gradients land on the parameters, feature gradients are cached
    for index, ((chunk_pixels, chunk_tokens), state, image_grad, text_grad) in enumerate(zip(
            chunks, states, image.grad.split(micro_batch), text.grad.split(micro_batch))):
        last = index == len(chunks) - 1
        with _replayed_rng(state), (nullcontext() if last or no_sync is None else no_sync()):
            output = forward(chunk_pixels, chunk_tokens)  # the normalized features, as in step 1
            surrogate = (output["image_features"] * image_grad).sum() + (output["text_features"] * text_grad).sum()
            # every parameter in the graph (with a zero), as DDP expects of each backward
            for name in ("logit_scale", "logit_bias"):
                if name in output:
                    surrogate = surrogate + 0.0 * output[name].sum()
            surrogate.backward()
    return loss.detach()
