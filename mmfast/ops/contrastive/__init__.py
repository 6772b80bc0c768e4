"""Large-batch contrastive losses (CLIP's InfoNCE and SigLIP) that never build the N x N logits.

Shapes: features `[N, D]` (image rows, text rows), float32, float16 or bfloat16, used as
given (normalize them yourself, as open_clip's models do). Accumulation is float32 and the
loss is a float32 scalar, under torch.autocast too (it is switched off inside the losses); feature gradients come back in the features' dtype. Memory is
O(N * D) on every backend.
"""
from __future__ import annotations

import torch

from mmfast.ops._backend import profiled, resolve_backend
from mmfast.ops._validation import as_scalar_tensor, check_features, check_same
from mmfast.ops.contrastive.function import SigmoidPairLoss, SimilarityLogsumexp, float32_math

__all__ = ["clip_loss", "siglip_loss", "similarity_logsumexp"]

_IMPLEMENTED = ("triton", "reference")


def _kernels(op: str, backend: str | None, device: torch.device):
    if resolve_backend(op, backend, device, _IMPLEMENTED) == "triton":
        from mmfast.ops.contrastive import triton as kernels
    else:
        from mmfast.ops.contrastive import chunked as kernels
    return kernels


def _check_pair(op: str, names: tuple[str, str], a, b, *, same_rows: bool):
    check_features(op, names[0], a)
    check_features(op, names[1], b)
    check_same(op, names, a, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must have the same feature size D, "
                         f"got {a.shape[1]} and {b.shape[1]}")
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must have the same number of rows N (pairs), "
                         f"got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must have at least one row, "
                         f"got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a.contiguous(), b.contiguous()


@profiled
def similarity_logsumexp(a: torch.Tensor, b: torch.Tensor, scale, *, columns: bool = True,
                         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of `scale * a @ b.T` without building it.

    a: `[M, D]`, b: `[N, D]` (one dtype, one device), scale: float or one-element tensor.
    Returns float32 `row_lse [M]` and `col_lse [N]` (`[0]` when `columns=False`), both
    differentiable with respect to a, b and scale. The building block of `clip_loss` and of
    the distributed `mmfast.nn.ClipLoss` (local rows against gathered columns).
    """
    op = "similarity_logsumexp"
    a, b = _check_pair(op, ("a", "b"), a, b, same_rows=False)
    scale = as_scalar_tensor(op, "scale", scale, a.device)
    with float32_math():
        return SimilarityLogsumexp.apply(a, b, scale, columns, _kernels(op, backend, a.device))


@profiled
def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *,
              backend: str | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: mean of the image->text and text->image cross-entropies.

    image_features, text_features: `[N, D]`, row i of each is a positive pair.
    logit_scale: the multiplier as open_clip passes it (already exponentiated): a float or
    a one-element tensor, which receives a gradient. Returns a float32 scalar equal to
    `(CE(s * I @ T.T, arange(N)) + CE(s * T @ I.T, arange(N))) / 2`.
    """
    op = "clip_loss"
    image, text = _check_pair(op, ("image_features", "text_features"), image_features, text_features,
                              same_rows=True)
    scale = as_scalar_tensor(op, "logit_scale", logit_scale, image.device)
    with float32_math():
        row_lse, col_lse = SimilarityLogsumexp.apply(image, text, scale, True, _kernels(op, backend, image.device))
        positives = scale.float() * (image.float() * text.float()).sum(dim=1)
        return ((row_lse - positives).mean() + (col_lse - positives).mean()) / 2


@profiled
def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                positive_offset: int | None = 0, backend: str | None = None) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss, as open_clip's `SigLipLoss` computes it.

    image_features: `[M, D]`, text_features: `[N, D]`; logit_scale and logit_bias: floats or
    one-element tensors (both receive gradients). Returns the float32 scalar
    `-sum_ij log sigmoid(y_ij * (s * I_i . T_j + b)) / M`, where y_ij = +1 for the positive
    pair j == i + positive_offset and -1 otherwise. The default (offset 0, M == N) is the
    single-device loss; `positive_offset=None` makes every pair negative, and a rank's offset
    into gathered text features gives the distributed loss (`mmfast.nn.SigLipLoss`).
    """
    op = "siglip_loss"
    image, text = _check_pair(op, ("image_features", "text_features"), image_features, text_features,
                              same_rows=False)
    if positive_offset is not None and not isinstance(positive_offset, int):
        raise TypeError(f"{op}: positive_offset must be an int or None, got {type(positive_offset).__name__}")
    scale = as_scalar_tensor(op, "logit_scale", logit_scale, image.device)
    bias = as_scalar_tensor(op, "logit_bias", logit_bias, image.device)
    with float32_math():
        return SigmoidPairLoss.apply(image, text, scale, bias, positive_offset, _kernels(op, backend, image.device))
