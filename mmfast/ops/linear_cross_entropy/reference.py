"""The materialized linear cross-entropy: the test oracle.

It builds the whole [T, V] logits, as `F.cross_entropy(hidden @ weight.T)` does in a language
model's head, so it is for checking, not for training with a large vocabulary (chunked.py is the
PyTorch path that does not).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         logit_softcap=None, reduction="mean", dtype=torch.float32):
    """hidden [T, D] @ weight [V, D].T (+ bias [V]), softcapped as cap * tanh(z / cap), then
    F.cross_entropy with the same arguments, all in `dtype`."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
