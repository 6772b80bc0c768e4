"""An output head that computes its cross-entropy without logits: an `nn.Linear` (same parameters,
same state-dict keys, so a language model's `lm_head` swaps in place) whose forward takes the
labels too."""
from __future__ import annotations

import torch
from torch import nn

from mmfast.ops.linear_cross_entropy import linear_cross_entropy


class LinearCrossEntropy(nn.Linear):
    """`forward(hidden [..., D], labels [...]) -> loss` by `mmfast.ops.linear_cross_entropy` (the
    float32 loss of `F.cross_entropy(self(hidden), labels, ...)` without the [tokens, V]
    logits); `forward(hidden)` or `labels=None` returns the logits as nn.Linear does (generation).
    ignore_index, label_smoothing, logit_softcap, reduction: as in the op."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 ignore_index: int = -100, label_smoothing: float = 0.0, logit_softcap: float | None = None,
                 reduction: str = "mean", backend: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.logit_softcap, self.reduction, self.backend = logit_softcap, reduction, backend

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, *,
                ignore_index: int | None = None) -> torch.Tensor:
        """ignore_index: this call's, where the module's does not fit (a tokenizer's padding id)."""
        if labels is None:
            logits = super().forward(hidden)
            if self.logit_softcap is not None:
                logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
            return logits
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(hidden.device.type):  # as nn.Linear under autocast: the matmul's dtype
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                    label_smoothing=self.label_smoothing, logit_softcap=self.logit_softcap,
                                    reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"logit_softcap={self.logit_softcap}, reduction={self.reduction!r}")
