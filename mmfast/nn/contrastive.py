"""Drop-in replacements for open_clip's `ClipLoss` and `SigLipLoss` on the fused op.

Same constructor arguments, same forward signature, same losses and gradients, in one
process and across ranks (torch.distributed), without the N x N logits.
"""
from __future__ import annotations

import torch
from torch import nn

from mmfast.nn._distributed import all_gather_rows, ring_chunks
from mmfast.ops.contrastive import siglip_loss, similarity_logsumexp

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _check_world(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


class ClipLoss(nn.Module):
    """InfoNCE as open_clip's `ClipLoss`, computed by `mmfast.ops.similarity_logsumexp`.

    Across ranks (world_size > 1) features are gathered as open_clip gathers them:
    - local_loss=False: every rank computes the loss of the global batch.
    - local_loss=True: each rank's own rows against all gathered columns, labels offset by
      rank; with gather_with_grad=True the sum of the ranks' gradients is world_size times
      the gradient of the single-process loss on the global batch, so DDP's averaging makes
      it exact.
    `cache_labels` and `use_horovod` are accepted for signature compatibility; no labels are
    built, and horovod is not supported.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str | None = None):
        super().__init__()
        _check_world(rank, world_size)
        if use_horovod:
            raise ValueError("use_horovod=True is not supported by mmfast.nn.ClipLoss; use torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.backend = backend

    def get_ground_truth(self, device, num_logits: int) -> torch.Tensor:
        """The positive column of each local row (offset by rank with local_loss), as open_clip's."""
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        return labels + num_logits * self.rank if self.world_size > 1 and self.local_loss else labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """(logits_per_image, logits_per_text), materialized (what the caller asks for; forward never
        builds them), gathered across ranks as forward gathers."""
        all_image, all_text = image_features, text_features
        if self.world_size > 1:
            keep_local = not self.local_loss
            all_image = all_gather_rows(image_features, self.rank, self.world_size, with_grad=self.gather_with_grad,
                                        keep_local_grad=keep_local)
            all_text = all_gather_rows(text_features, self.rank, self.world_size, with_grad=self.gather_with_grad,
                                       keep_local_grad=keep_local)
        if self.world_size > 1 and not self.local_loss:
            per_image = logit_scale * all_image @ all_text.T
            per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ all_text.T
            per_text = logit_scale * text_features @ all_image.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        """image_features, text_features [B, D] (this rank's rows), logit_scale (exponentiated) a scalar
        or [1] -> the scalar loss ({"contrastive_loss": loss} with output_dict)."""
        # A bias shifts every logit of a row (and of a column) alike: softmax cancels it exactly.
        if self.world_size == 1:
            loss = self._loss(image_features, text_features, image_features, text_features, logit_scale, 0)
        else:
            keep_local = not self.local_loss
            all_image = all_gather_rows(image_features, self.rank, self.world_size,
                                        with_grad=self.gather_with_grad, keep_local_grad=keep_local)
            all_text = all_gather_rows(text_features, self.rank, self.world_size,
                                       with_grad=self.gather_with_grad, keep_local_grad=keep_local)
            if self.local_loss:
                offset = self.rank * image_features.shape[0]
                loss = self._loss(image_features, text_features, all_image, all_text, logit_scale, offset)
            else:
                loss = self._loss(all_image, all_text, all_image, all_text, logit_scale, 0)
        if logit_bias is not None:
            loss = loss + 0.0 * logit_bias.sum()  # keeps the bias in the graph with its exact gradient, 0
        return {"contrastive_loss": loss} if output_dict else loss

    def _loss(self, image, text, all_image, all_text, logit_scale, offset: int):
        # float32 under autocast too: the ops switch it off, and the positives are elementwise products
        # of float32 copies, which autocast leaves alone
        n = image.shape[0]
        scale = logit_scale.float() if torch.is_tensor(logit_scale) else logit_scale
        if image is all_image:  # square: row and column log-sum-exp from the same tiles
            image_lse, text_lse = similarity_logsumexp(image, text, logit_scale, backend=self.backend)
            image_positive = text_positive = scale * (image.float() * text.float()).sum(dim=1)
        else:
            image_lse, _ = similarity_logsumexp(image, all_text, logit_scale, columns=False, backend=self.backend)
            text_lse, _ = similarity_logsumexp(text, all_image, logit_scale, columns=False, backend=self.backend)
            image_positive = scale * (image.float() * all_text[offset:offset + n].float()).sum(dim=1)
            text_positive = scale * (text.float() * all_image[offset:offset + n].float()).sum(dim=1)
        return ((image_lse - image_positive).mean() + (text_lse - text_positive).mean()) / 2


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss as open_clip's `SigLipLoss`, on `mmfast.ops.siglip_loss`.

    Each rank scores its own images against every rank's text and divides by its local batch,
    exactly as open_clip. dist_impl: "bidir" (default) and "shift" pass text features around a
    ring (text memory stays at one chunk); "gather" and "reduce" all-gather the text features
    and score them in one fused call (the same loss and gradients as open_clip's all-reduce
    variant, with less communication).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, chunk_size: int = 0, *, backend: str | None = None):
        super().__init__()
        _check_world(rank, world_size)
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
        # open_clip's chunk_size bounds its logits' memory; the fused loss never builds them at all,
        # so every chunk_size gives the same loss here (kept for signature compatibility)
        self.chunk_size = chunk_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.backend = backend

    def get_ground_truth(self, device, dtype, num_logits: int, negative_only: bool = False) -> torch.Tensor:
        """+1 on the diagonal (positive pairs), -1 elsewhere; all -1 with negative_only, as open_clip's."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        return labels if negative_only else labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """scale * image @ text.T (+ bias), materialized: what the caller asks for."""
        logits = logit_scale * image_features @ text_features.T
        return logits + logit_bias if logit_bias is not None else logits

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only: bool = False):
        """One block's loss, as open_clip's `_loss`: image rows against these text rows, the diagonal
        positive unless negative_only, divided by the image rows."""
        bias = 0.0 if logit_bias is None else logit_bias
        return siglip_loss(image_features, text_features, logit_scale, bias,
                           positive_offset=None if negative_only else 0, backend=self.backend)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        """image_features, text_features [B, D] (this rank's rows), logit_scale (exponentiated) and
        logit_bias scalars or [1] -> the scalar loss ({"contrastive_loss": loss} with output_dict)."""
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        elif self.dist_impl in ("gather", "reduce"):
            all_text = all_gather_rows(text_features, self.rank, self.world_size, with_grad=True,
                                       keep_local_grad=True)
            loss = siglip_loss(image_features, all_text, logit_scale, logit_bias,
                               positive_offset=self.rank * text_features.shape[0], backend=self.backend)
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
            chunks = ring_chunks(text_features, self.rank, self.world_size,
                                 bidirectional=self.dist_impl == "bidir")
            for other_text in chunks:
                loss = loss + siglip_loss(image_features, other_text, logit_scale, logit_bias,
                                          positive_offset=None, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
