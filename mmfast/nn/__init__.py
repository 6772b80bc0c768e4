"""Tier 2: drop-in torch.nn modules on mmfast's ops, signature-compatible with the peers."""
from mmfast.nn.attention import MixedAttention
from mmfast.nn.kv_cache import KVCache
from mmfast.nn.spectrogram import MelSpectrogram
from mmfast.nn.contrastive import ClipLoss, SigLipLoss
from mmfast.nn.linear_cross_entropy import LinearCrossEntropy
from mmfast.nn.patch_embed import (ASTPatchEmbed, CLIPVisionEmbeddings, PatchEmbed, SiglipVisionEmbeddings,
                                   TubeletEmbed)

__all__ = ["ASTPatchEmbed", "CLIPVisionEmbeddings", "ClipLoss", "KVCache", "LinearCrossEntropy", "MelSpectrogram", "MixedAttention", "PatchEmbed", "SigLipLoss",
           "SiglipVisionEmbeddings", "TubeletEmbed"]
