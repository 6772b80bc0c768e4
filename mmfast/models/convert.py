"""Load HF `CLIPModel` and open_clip `CLIP` weights into `mmfast.models.CLIP` (same embeddings).

    hf = transformers.CLIPModel.from_pretrained("/path/on/disk")      # no hub needed for a local dir
    model = mmfast.models.from_hf_clip(hf)
    model = mmfast.models.from_open_clip(open_clip_model, quick_gelu=True)
"""
from __future__ import annotations

import re

import torch

from mmfast.models.clip import CLIP, ClipConfig, TextConfig, VisionConfig


def load_renamed(model: torch.nn.Module, state: dict, renames, *, zero_key_bias: bool = False) -> torch.nn.Module:
    """Loads a peer's state dict into `model` (strict) with each key rewritten by the (pattern,
    replacement) regexes in order. zero_key_bias: the peer's attention has no key bias (Whisper,
    VideoMAE): ours gets zeros, which change nothing (a bias on every key shifts all of a query's
    scores alike, and softmax ignores that)."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    if zero_key_bias:
        for name, parameter in model.named_parameters():
            if name.endswith("self_attn.k_proj.bias"):
                renamed.setdefault(name, torch.zeros_like(parameter))
    model.load_state_dict(renamed, strict=True)
    return model

_HF_RENAMES = [
    (r"^text_model\.embeddings\.(token|position)_embedding\.", r"text_model.\1_embedding."),
    (r"\.encoder\.layers\.", ".layers."),
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
]


def hf_clip_config(hf_config, backend: str | None = None, mean=None, std=None) -> ClipConfig:
    """mean, std: set to take uint8 pixels normalized inside the model (e.g. the CLIP processor's
    image_mean and image_std); None takes HF's normalized float pixel_values."""
    vision, text = hf_config.vision_config, hf_config.text_config
    activation = "quick_gelu" if vision.hidden_act == "quick_gelu" else "gelu"
    eos = getattr(text, "eos_token_id", None)
    return ClipConfig(
        embed_dim=hf_config.projection_dim,
        vision=VisionConfig(image_size=vision.image_size, patch_size=vision.patch_size, channels=vision.num_channels,
                            width=vision.hidden_size, layers=vision.num_hidden_layers,
                            heads=vision.num_attention_heads, mlp_ratio=vision.intermediate_size / vision.hidden_size,
                            mean=mean, std=std),
        text=TextConfig(vocab_size=text.vocab_size, context_length=text.max_position_embeddings, width=text.hidden_size,
                        layers=text.num_hidden_layers, heads=text.num_attention_heads,
                        mlp_ratio=text.intermediate_size / text.hidden_size,
                        eot_token_id=None if eos in (None, 2) else eos),  # HF's legacy eos 2 means argmax
        activation=activation, init_logit_scale=float(hf_config.logit_scale_init_value), backend=backend)


def from_hf_clip(hf_model, backend: str | None = None, *, mean=None, std=None) -> CLIP:
    """A CLIP with an HF CLIPModel's weights (mean, std: as hf_clip_config's)."""
    model = CLIP(hf_clip_config(hf_model.config, backend, mean, std))
    state = {}
    for key, value in hf_model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        for pattern, replacement in _HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        state[key] = value
    model.load_state_dict(state, strict=True)
    return model


def _open_clip_blocks(prefix: str, source: dict, target_prefix: str, layers: int, state: dict) -> None:
    for index in range(layers):
        block, ours = f"{prefix}transformer.resblocks.{index}.", f"{target_prefix}layers.{index}."
        for name in ("weight", "bias"):
            q, k, v = source[f"{block}attn.in_proj_{name}"].chunk(3)
            state[f"{ours}self_attn.q_proj.{name}"] = q
            state[f"{ours}self_attn.k_proj.{name}"] = k
            state[f"{ours}self_attn.v_proj.{name}"] = v
            state[f"{ours}self_attn.o_proj.{name}"] = source[f"{block}attn.out_proj.{name}"]
            state[f"{ours}layer_norm1.{name}"] = source[f"{block}ln_1.{name}"]
            state[f"{ours}layer_norm2.{name}"] = source[f"{block}ln_2.{name}"]
            state[f"{ours}mlp.fc1.{name}"] = source[f"{block}mlp.c_fc.{name}"]
            state[f"{ours}mlp.fc2.{name}"] = source[f"{block}mlp.c_proj.{name}"]


def from_open_clip(open_clip_model, *, quick_gelu: bool, backend: str | None = None, mean=None, std=None) -> CLIP:
    """A CLIP with an open_clip `CLIP`'s weights (standard ViT towers; quick_gelu as the model was
    built, e.g. True for OpenAI's checkpoints). With `mean` and `std` (open_clip's preprocessing
    values) it takes uint8 pixels and normalizes them in its patch embedding; without, normalized
    float pixels as open_clip does."""
    source = open_clip_model.state_dict()
    visual = open_clip_model.visual
    width, patches_plus_one = source["visual.positional_embedding"].shape[1], source["visual.positional_embedding"].shape[0]
    vision_layers = len(visual.transformer.resblocks)
    text_layers = len(open_clip_model.transformer.resblocks)
    text_width = source["token_embedding.weight"].shape[1]
    config = ClipConfig(
        embed_dim=source["text_projection"].shape[1],
        vision=VisionConfig(image_size=visual.image_size[0], patch_size=visual.patch_size[0],
                            channels=source["visual.conv1.weight"].shape[1], width=width, layers=vision_layers,
                            heads=visual.transformer.resblocks[0].attn.num_heads,
                            mlp_ratio=source["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                            mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None),
        text=TextConfig(vocab_size=source["token_embedding.weight"].shape[0],
                        context_length=source["positional_embedding"].shape[0], width=text_width, layers=text_layers,
                        heads=open_clip_model.transformer.resblocks[0].attn.num_heads,
                        mlp_ratio=source["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width),
        activation="quick_gelu" if quick_gelu else "gelu", backend=backend)
    if patches_plus_one != (config.vision.image_size // config.vision.patch_size) ** 2 + 1:
        raise ValueError("from_open_clip: only the class-token ViT tower (pool_type 'tok') converts")
    state = {
        "vision_model.embeddings.class_embedding": source["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": source["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": source["visual.positional_embedding"],
        "visual_projection.weight": source["visual.proj"].T,
        "text_model.token_embedding.weight": source["token_embedding.weight"],
        "text_model.position_embedding.weight": source["positional_embedding"],
        "text_projection.weight": source["text_projection"].T,
        "logit_scale": source["logit_scale"].reshape(()),
    }
    for ours, theirs in (("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                         ("text_model.final_layer_norm", "ln_final")):
        for name in ("weight", "bias"):
            state[f"{ours}.{name}"] = source[f"{theirs}.{name}"]
    _open_clip_blocks("visual.", source, "vision_model.", vision_layers, state)
    _open_clip_blocks("", source, "text_model.", text_layers, state)
    model = CLIP(config)
    model.load_state_dict({key: torch.as_tensor(value) for key, value in state.items()}, strict=True)
    return model
