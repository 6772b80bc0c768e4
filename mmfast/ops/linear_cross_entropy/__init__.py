"""Linear cross-entropy: a language model's output head and its cross-entropy in one op that never
holds the [tokens, vocab] logits (Liger-Kernel's FusedLinearCrossEntropy and Apple's Cut
Cross-Entropy do the same job).

Shapes: hidden `[..., D]` (float32, float16 or bfloat16), weight `[V, D]` and bias `[V]` of the
same dtype, labels `[...]` integer. Logits accumulate in float32; the loss is float32 (under
torch.autocast too); gradients come back in the inputs' dtypes. Memory beyond inputs and
gradients: O(T) saved for backward, plus a bounded block of logits (PyTorch path) or of their
gradient (Triton path) at a time.
"""
from __future__ import annotations

import torch

from mmfast.ops._backend import profiled, resolve_backend
from mmfast.ops._validation import FLOAT_DTYPES
from mmfast.ops.linear_cross_entropy.function import LinearCrossEntropyFunction, Options, float32_math

__all__ = ["linear_cross_entropy"]

_IMPLEMENTED = ("triton", "reference")
REDUCTIONS = ("mean", "sum", "none")


def _kernels(backend: str | None, device: torch.device):
    if resolve_backend("linear_cross_entropy", backend, device, _IMPLEMENTED) == "triton":
        from mmfast.ops.linear_cross_entropy import triton as kernels
    else:
        from mmfast.ops.linear_cross_entropy import chunked as kernels
    return kernels


def _check(hidden, weight, labels, bias, ignore_index, label_smoothing, logit_softcap, reduction):
    op = "linear_cross_entropy"
    for name, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() < 1 or hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: hidden must be a [..., D] float32, float16 or bfloat16 tensor, "
                        f"got shape {tuple(hidden.shape)} and {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must be [V, D] with D = hidden's last size {hidden.shape[-1]} and V >= 1, "
                         f"got shape {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: labels must be an int64 or int32 tensor of hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}, got shape {tuple(labels.shape)} and {labels.dtype}")
    tensors = [("weight", weight), ("labels", labels)] + ([("bias", bias)] if bias is not None else [])
    for name, tensor in tensors:
        if tensor.device != hidden.device:
            raise ValueError(f"{op}: {name} must be on hidden's device {hidden.device}, got {tensor.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)
                             or bias.dtype != hidden.dtype):
        raise ValueError(f"{op}: bias must be a [{weight.shape[0]}] tensor of dtype {hidden.dtype} or None, got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if logit_softcap is not None and not float(logit_softcap) > 0:
        raise ValueError(f"{op}: logit_softcap must be a positive number or None, got {logit_softcap}")


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels outside [0, V) that are not ignore_index would silently match no logit in a kernel.
    Checked without a host sync on CUDA (a device-side assert, like F.cross_entropy's)."""
    outside = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.device.type == "cuda":
        torch._assert_async(~outside.any(), f"linear_cross_entropy: labels must be in [0, {vocab}) or ignore_index")
    elif bool(outside.any()):
        bad = labels[outside][0].item()
        raise ValueError(f"linear_cross_entropy: labels must be in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {bad}")


@profiled
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                         logit_softcap: float | None = None, reduction: str = "mean",
                         backend: str | None = None) -> torch.Tensor:
    """`F.cross_entropy(z, labels, ignore_index=, label_smoothing=, reduction=)` of the logits
    `z = hidden @ weight.T + bias` (softcapped to `logit_softcap * tanh(z / logit_softcap)` when
    given, as Gemma 2 does), without building z.

    hidden: `[..., D]`; weight: `[V, D]`; labels: `[...]` in [0, V) or ignore_index; bias: `[V]`.
    Returns a float32 scalar ("mean": over the labels that are not ignored, NaN when all are, as
    PyTorch; "sum") or per-token losses of labels' shape ("none", 0 where ignored). Gradients
    reach hidden, weight and bias.
    """
    _check(hidden, weight, labels, bias, ignore_index, label_smoothing, logit_softcap, reduction)
    vocab = weight.shape[0]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).long().contiguous()
    _check_label_range(flat_labels, vocab, ignore_index)
    options = Options(ignore_index, float(label_smoothing), None if logit_softcap is None else float(logit_softcap))
    kernels = _kernels(backend, hidden.device)
    with float32_math():
        losses = LinearCrossEntropyFunction.apply(flat_hidden, weight.contiguous(),
                                                  None if bias is None else bias.contiguous(),
                                                  flat_labels, options, kernels)
        if reduction == "none":
            return losses.view(labels.shape)
        if reduction == "sum":
            return losses.sum()
        return losses.sum() / (flat_labels != ignore_index).sum()
