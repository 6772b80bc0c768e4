"""The PyTorch path of the linear cross-entropy (CPU tensors, or backend="reference"): the logits of
a block of tokens at a time, in float32, so memory stays O(T x D + chunk x V) instead of O(T x V).

Same interface as triton.py: forward returns per-token losses and the log-sum-exp, backward
recomputes each block's logits from them (nothing [T, V] is saved between the two).
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # float32 logits held at a time: 16 MiB


def _logits(hidden, weight, bias, softcap):
    """float32 logits of a block of tokens, softcapped; also the uncapped tanh for the gradient."""
    logits = hidden.float() @ weight.T
    if bias is not None:
        logits += bias
    if softcap is None:
        return logits, None
    squashed = torch.tanh(logits / softcap)
    return squashed * softcap, squashed


def _rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def forward(hidden, weight, bias, labels, options):
    """(losses [T], lse [T]) in float32; losses are 0 on ignored labels."""
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    tokens, vocab = hidden.shape[0], weight.shape[0]
    losses = torch.empty(tokens, device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(losses)
    smoothing = options.label_smoothing
    for start in range(0, tokens, _rows(vocab)):
        end = min(start + _rows(vocab), tokens)
        logits, _ = _logits(hidden[start:end], weight32, bias32, options.logit_softcap)
        label = labels[start:end]
        valid = label != options.ignore_index
        block_lse = torch.logsumexp(logits, dim=1)
        target = logits.gather(1, torch.where(valid, label, 0)[:, None])[:, 0]
        loss = block_lse - (1.0 - smoothing) * target
        if smoothing:
            loss -= smoothing * logits.mean(dim=1)
        losses[start:end] = torch.where(valid, loss, 0.0)
        lse[start:end] = block_lse
    return losses, lse


def backward(hidden, weight, bias, labels, lse, grad, options, needs=(True, True, True)):
    """(d_hidden, d_weight, d_bias) of sum(grad * losses), each None where `needs` says it is not wanted
    (a frozen head); grad [T] float32, 0 on ignored rows."""
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    tokens, vocab = hidden.shape[0], weight.shape[0]
    d_hidden = torch.empty_like(hidden) if needs[0] else None
    d_weight = torch.zeros_like(weight32) if needs[1] else None
    d_bias = torch.zeros_like(bias32) if bias is not None and needs[2] else None
    smoothing, softcap = options.label_smoothing, options.logit_softcap
    for start in range(0, tokens, _rows(vocab)):
        end = min(start + _rows(vocab), tokens)
        block = hidden[start:end].float()
        logits, squashed = _logits(block, weight32, bias32, softcap)
        label = labels[start:end]
        valid = label != options.ignore_index
        # dLoss/dLogits = softmax - (1 - smoothing) * one_hot - smoothing / V, times each token's grad
        d_logits = torch.exp(logits - lse[start:end, None])
        d_logits[valid.nonzero()[:, 0], label[valid]] -= 1.0 - smoothing
        if smoothing:
            d_logits -= smoothing / vocab
        d_logits *= grad[start:end, None]
        if softcap is not None:
            d_logits *= 1.0 - squashed * squashed
        if d_hidden is not None:
            d_hidden[start:end] = (d_logits @ weight32).to(hidden.dtype)
        if d_weight is not None:
            d_weight.addmm_(d_logits.T, block)
        if d_bias is not None:
            d_bias += d_logits.sum(dim=0)
    return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))
