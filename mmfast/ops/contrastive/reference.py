"""Dense PyTorch versions of the contrastive losses: the test oracle.

They build the full N x N logits (as open_clip does), so they are for checking,
not for training at scale: the CPU training path is chunked.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_logsumexp(a, b, scale, dtype=torch.float32):
    """The materialized oracle: a [M, D], b [N, D], scale -> (row lse [M], column lse [N]) in `dtype`."""
    logits = (a.to(dtype) @ b.to(dtype).T) * scale.to(dtype)
    return torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)


def clip_loss(image_features, text_features, logit_scale, dtype=torch.float32):
    """The materialized oracle: features [N, D], logit_scale -> the mean of both directions' cross-entropy."""
    logits = (image_features.to(dtype) @ text_features.to(dtype).T) * logit_scale.to(dtype)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias, positive_offset=0, dtype=torch.float32):
    """The materialized oracle: image [M, D], text [N, D] features -> the sum of softplus(-y z) over
    all M x N pairs divided by M (y = +1 on the diagonal shifted by positive_offset)."""
    logits = (image_features.to(dtype) @ text_features.to(dtype).T) * logit_scale.to(dtype) + logit_bias.to(dtype)
    signs = -torch.ones_like(logits)
    if positive_offset is not None:
        rows = torch.arange(logits.shape[0], device=logits.device)
        columns = rows + positive_offset
        valid = (columns >= 0) & (columns < logits.shape[1])
        signs[rows[valid], columns[valid]] = 1.0
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
