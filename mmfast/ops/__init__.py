"""Tier 1: stateless fused ops, one package per op. See ARCHITECTURE.md."""
from mmfast.ops._backend import BACKENDS
from mmfast.ops.contrastive import clip_loss, siglip_loss, similarity_logsumexp
from mmfast.ops.linear_cross_entropy import linear_cross_entropy
from mmfast.ops.log_mel import log_mel_spectrogram
from mmfast.ops.mixed_attention import mixed_attention
from mmfast.ops.patch_embed import patch_embed

__all__ = ["BACKENDS", "clip_loss", "linear_cross_entropy", "log_mel_spectrogram", "mixed_attention", "patch_embed", "siglip_loss", "similarity_logsumexp"]
