"""Tier 1: stateless fused ops, one package per op. See ARCHITECTURE.md."""
from mmfast.ops._backend import BACKENDS
from mmfast.ops.contrastive import clip_loss, siglip_loss, similarity_logsumexp

__all__ = ["BACKENDS", "clip_loss", "siglip_loss", "similarity_logsumexp"]
