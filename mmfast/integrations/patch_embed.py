"""Swap the patch embedding of a timm or HF model for mmfast's, keeping its parameters.

    import mmfast.integrations.patch_embed as mpe
    replaced = mpe.swap_patch_embedding(model)   # timm ViT, HF CLIP / SigLIP / VideoMAE / AST

The new modules hold the very same Parameter objects (optimizer state stays valid) and give
the same outputs. Classes are matched by name, so neither timm nor transformers is imported.
"""
from __future__ import annotations

from torch import nn

from mmfast.nn import patch_embed as ours

REPLACEMENTS = {
    "PatchEmbed": ours.PatchEmbed,  # timm.layers.PatchEmbed
    "CLIPVisionEmbeddings": ours.CLIPVisionEmbeddings,
    "SiglipVisionEmbeddings": ours.SiglipVisionEmbeddings,
    "VideoMAEPatchEmbeddings": ours.TubeletEmbed,
    "ASTEmbeddings": ours.ASTPatchEmbed,
}


def swap_patch_embedding(model: nn.Module, **extras) -> list[str]:
    """Replaces every known patch-embedding module inside `model`; returns their names.

    extras (mean, std, backend) go to the new modules where they apply. Raises ValueError when
    the model holds none, so a silent no-op cannot pass for a speedup.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind not in REPLACEMENTS or isinstance(module, tuple(REPLACEMENTS.values())):
            continue
        if kind == "PatchEmbed" and not type(module).__module__.startswith("timm"):
            continue
        new = REPLACEMENTS[kind].from_peer(module, **extras)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(name)
    if not replaced:
        raise ValueError(f"swap_patch_embedding: no patch embedding of {sorted(REPLACEMENTS)} found in "
                         f"{type(model).__name__}")
    return replaced
