"""CLIP / SigLIP dual encoder on mmfast's modules (single-device model code).

Vision: `mmfast.nn.CLIPVisionEmbeddings` (fused patch embedding, class token, positions) -> pre-norm
-> pre-norm transformer blocks on `mmfast.nn.MixedAttention` (bidirectional) -> norm of the class
token -> projection. Text: token + position embeddings -> causal blocks -> final norm -> the
features at the end-of-text token (the largest token id, as OpenAI's CLIP, or a given id; or the
mean of the states up to it, text.pooling="mean") -> projection. Module names follow HF's
CLIPModel where they can, so converting is renaming (see convert.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmfast.nn.attention import MixedAttention
from mmfast.nn.patch_embed import CLIPVisionEmbeddings
from mmfast.ops.mixed_attention import build_packing


@dataclass(kw_only=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    patch_stride: int | None = None  # None: the patch size; smaller: overlapping patches (not in HF's CLIP)
    channels: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # set: the model takes uint8 pixels and normalizes them inside the fused patch embedding with
    # this per-channel mean and std (of [0, 1] values); None: it takes normalized float pixels, as HF's
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(kw_only=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    eot_token_id: int | None = None  # None: the largest id in each row (OpenAI's convention)
    # "eot": the state at the end-of-text token (CLIP's, HF's, open_clip's). "mean": the mean of the states
    # up to it; a freshly initialized tower then already tells captions apart by their words (at the end
    # token alone "a red circle." and "a red square." have cosine 0.999 at the start), which a small model
    # trained briefly needs to learn shapes (see the README, "The main job: numbers")
    pooling: str = "eot"
    # False: bidirectional (BERT's, for masked-language-model pretraining, task mlm): each row's tokens up to
    # its end token attend to each other, packed into one sequence per row, so padding is never attended
    causal: bool = True


@dataclass(kw_only=True)
class ClipConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = "quick_gelu"  # or "gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for SigLIP
    backend: str | None = None


def clip_config(size: str, **overrides) -> ClipConfig:
    """Named sizes: "tiny" (tests, CPU runs), "ViT-B/16", "ViT-L/14" (OpenAI's shapes)."""
    sizes = {
        "tiny": ClipConfig(embed_dim=64, vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2),
                           text=TextConfig(vocab_size=1000, context_length=16, width=64, layers=2, heads=2)),
        "ViT-B/16": ClipConfig(embed_dim=512, vision=VisionConfig(patch_size=16, width=768, layers=12, heads=12),
                               text=TextConfig(width=512, layers=12, heads=8)),
        "ViT-L/14": ClipConfig(embed_dim=768, vision=VisionConfig(patch_size=14, width=1024, layers=24, heads=16),
                               text=TextConfig(width=768, layers=12, heads=12)),
    }
    if size not in sizes:
        raise ValueError(f"clip_config: size must be one of {sorted(sizes)}, got {size!r}")
    config = sizes[size]
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"clip_config: unknown field {key!r}")
        setattr(config, key, value)
    return config


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `layers` blocks over one sequence: projections, MLP and attention matmuls."""
    per_token = 2 * (4 * width * width + 2 * width * int(width * mlp_ratio)) + 2 * 2 * tokens * width
    return layers * tokens * per_token


def patch_count(vision: VisionConfig) -> int:
    """Patches of one image (a Conv's count: overlapping when patch_stride is below the patch size)."""
    return ((vision.image_size - vision.patch_size) // (vision.patch_stride or vision.patch_size) + 1) ** 2


def flops_per_sample(config: ClipConfig) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one image-text pair for mmfast's CLIP;
    recomputation under activation checkpointing is not counted, as MFU conventionally does."""
    vision, text = config.vision, config.text
    patches = patch_count(vision)
    forward = 2 * patches * vision.channels * vision.patch_size ** 2 * vision.width
    forward += transformer_flops(patches + 1, vision.width, vision.layers, vision.mlp_ratio)
    forward += transformer_flops(text.context_length, text.width, text.layers, text.mlp_ratio)
    forward += 2 * config.embed_dim * (vision.width + text.width)
    return 3.0 * forward


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {ACTIVATIONS}, got {activation!r}")
        # gelu_tanh: SigLIP's (HF's gelu_pytorch_tanh)
        self.activation = QuickGELU() if activation == "quick_gelu" else nn.GELU(
            approximate="tanh" if activation == "gelu_tanh" else "none")

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool, activation: str, backend):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width)
        self.self_attn = MixedAttention(width, heads, bias=True, causal=causal, rotary_base=None, backend=backend)
        self.layer_norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x, **attention):
        """[B, T, width] -> [B, T, width]; `attention` goes to MixedAttention (cu_seqlens, spans)."""
        x = x + self.self_attn(self.layer_norm1(x), **attention)
        return x + self.mlp(self.layer_norm2(x))


def run_blocks(layers: nn.ModuleList, x: torch.Tensor, recompute: bool, **attention) -> torch.Tensor:
    """`attention` goes to every block's MixedAttention (packing)."""
    for layer in layers:
        # activation checkpointing keeps one tensor per block and recomputes the rest in backward
        x = (checkpoint(layer, x, use_reentrant=False, **attention) if recompute and torch.is_grad_enabled()
             else layer(x, **attention))
    return x


def run_packed(layers: nn.ModuleList, x: torch.Tensor, valid: torch.Tensor, recompute: bool,
               norm: nn.Module | None = None) -> torch.Tensor:
    """Bidirectional blocks over `[B, T, width]` where `valid` `[B, T]` marks each row's real tokens: each
    row's real tokens packed as one sequence (cu_seqlens; the packing tables built once, shared by every
    layer), so no token attends to padding and no mask tensor is built. Returns `[B, T, width]`, the real
    tokens' states (through `norm` where given) and zeros elsewhere."""
    lengths = valid.sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    packing = build_packing(cu_seqlens, None, int(cu_seqlens[-1]), int(lengths.max()), causal=False)
    states = run_blocks(layers, x[valid], recompute, packing=packing)
    if norm is not None:
        states = norm(states)
    return states.new_zeros(*x.shape[:2], states.shape[-1]).index_put((valid,), states)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, activation: str, backend=None):
        super().__init__()
        hf_like = SimpleNamespace(hidden_size=config.width, image_size=config.image_size,
                                  patch_size=config.patch_size, num_channels=config.channels)
        self.embeddings = CLIPVisionEmbeddings(hf_like, mean=config.mean, std=config.std, stride=config.patch_stride,
                                               backend=backend)
        # HF builds these embeddings at standard deviation 1 and re-initializes them in its _init_weights
        # (positions at 0.02, the class token at width^-1/2). Left at 1, the positions drown the patches'
        # content: the main job's tower trained on shape labels alone named 0.46 of held-out shapes after
        # 200 steps, 0.71 initialized this way (benchmarks/shape_learning.py clip-p8-stride4)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.class_embedding, std=0.02)
        patch_weight = self.embeddings.patch_embedding.weight
        nn.init.normal_(patch_weight, std=patch_weight[0].numel() ** -0.5)
        self.pre_layrnorm = nn.LayerNorm(config.width)  # HF's spelling, kept for the state dict
        self.layers = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio, False, activation, backend)
                                    for _ in range(config.layers))
        self.post_layernorm = nn.LayerNorm(config.width)
        self.grad_checkpointing = False

    def forward(self, pixels: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """[B, C, H, W] pixels (uint8, normalized with config.mean/std, or float) -> the class token's state
        [B, width]."""
        return self.post_layernorm(self.token_states(pixels, interpolate_pos_encoding)[:, 0])

    def token_states(self, pixels: torch.Tensor, interpolate_pos_encoding: bool = False,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's states of the class token and every patch `[B, 1 + N, width]` (before the
        final norm); keep `[B, K]`: only those patches embedded and attended (masked autoencoders)."""
        x = self.pre_layrnorm(self.embeddings(pixels, interpolate_pos_encoding, keep=keep))
        return run_blocks(self.layers, x, self.grad_checkpointing)


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig, activation: str, backend=None):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)
        self.layers = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio, config.causal, activation,
                                          backend) for _ in range(config.layers))
        self.final_layer_norm = nn.LayerNorm(config.width)
        self.grad_checkpointing = False

    def ends(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] each row's end-of-text position: of config.eot_token_id, or of the row's largest id."""
        if self.config.eot_token_id is None:
            return tokens.argmax(dim=-1)
        return (tokens == self.config.eot_token_id).int().argmax(dim=-1)

    def hidden_states(self, tokens: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] token ids -> [B, T, width], after the final norm. embeddings: [B, T, width] in place of the
        token embedding (a masked language model's corrupted input); `tokens` still mark each row's end.
        Bidirectional (config.causal false): the states after each row's end token are zero."""
        if tokens.shape[1] > self.config.context_length:
            raise ValueError(f"TextTransformer: {tokens.shape[1]} tokens exceed context_length "
                             f"{self.config.context_length}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = (self.token_embedding(tokens) if embeddings is None else embeddings) + self.position_embedding(positions)
        if self.config.causal:  # later padding never reaches the end token
            return self.final_layer_norm(run_blocks(self.layers, x, self.grad_checkpointing))
        real = positions <= self.ends(tokens)[:, None]  # bidirectional: padding never attended
        return run_packed(self.layers, x, real, self.grad_checkpointing, self.final_layer_norm)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, width]: each row's state at its end-of-text token."""
        x = self.hidden_states(tokens)
        end = self.ends(tokens)
        if self.config.pooling == "mean":
            kept = (torch.arange(tokens.shape[1], device=x.device) <= end[:, None]).to(x.dtype)  # [B, T]
            return (x * kept[..., None]).sum(1) / kept.sum(1, keepdim=True)
        return x[torch.arange(x.shape[0], device=x.device), end]


def _scalars_as_vectors(state_dict, prefix, *_):
    for name in ("logit_scale", "logit_bias"):
        value = state_dict.get(prefix + name)
        if value is not None and value.dim() == 0:
            state_dict[prefix + name] = value.reshape(1)


class DualEncoder(nn.Module):
    """What CLIP and its audio sibling (mmfast.models.clap.CLAP) share: the text tower and its projection,
    the learnable logit scale (and SigLIP's bias), and the forward's output. A subclass builds its other
    tower, the text tower (_text_model), the projections (the other tower's first: the order sets the
    initial weights and the optimizer's parameter order) and the logit parameters (_logit_parameters)."""

    def _text_model(self, config) -> TextTransformer:
        if config.text.pooling not in ("eot", "mean"):
            raise ValueError(f"{type(self).__name__}: text.pooling must be 'eot' or 'mean', got {config.text.pooling!r}")
        return TextTransformer(config.text, config.activation, config.backend)

    def _logit_parameters(self, config) -> None:
        # one-element vectors, not 0-dim: FSDP2 and DeepSpeed both refuse 0-dim parameters. The
        # 0-dim entries of HF and open_clip state dicts are reshaped on load (_scalars_as_vectors).
        self.logit_scale = nn.Parameter(torch.full([1], float(config.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.full([1], float(config.init_logit_bias)))
                           if config.init_logit_bias is not None else None)
        self._register_load_state_dict_pre_hook(_scalars_as_vectors)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as CLIP does. The cap is applied here rather than by
        clamping the parameter after each step, so it holds under every sharding engine (whose
        optimizers keep their own master copies); past the cap the scale's gradient is zero."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, T] token ids -> [B, embed_dim] features (unit length with normalize)."""
        features = self.text_projection(self.text_model(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def _output(self, name: str, features: torch.Tensor, tokens: torch.Tensor) -> dict:
        """{name: features, "text_features" (unit length), "logit_scale" [1] (exponentiated, capped),
        "logit_bias" [1] (SigLIP)}."""
        output = {name: features, "text_features": self.encode_text(tokens, normalize=True),
                  "logit_scale": self.scale()}
        if self.logit_bias is not None:
            output["logit_bias"] = self.logit_bias
        return output


class CLIP(DualEncoder):
    """`encode_image(pixels)`, `encode_text(tokens)`, and `forward` returning both (normalized) with
    the exponentiated logit scale (and bias) as open_clip's models do."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision, config.activation, config.backend)
        self.text_model = self._text_model(config)
        self.visual_projection = nn.Linear(config.vision.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self._logit_parameters(config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per transformer block (open_clip's and timm's method name)."""
        self.vision_model.grad_checkpointing = self.text_model.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks of both towers: the units to shard, compile or checkpoint."""
        return [*self.vision_model.layers, *self.text_model.layers]

    def towers(self) -> dict[str, nn.Module]:
        """The two encoders: one frozen (a locked tower, as in LiT) is kept whole on every rank by the
        engines that shard parameters."""
        return {"vision_model": self.vision_model, "text_model": self.text_model}

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, C, H, W] pixels -> [B, embed_dim] features (unit length with normalize)."""
        features = self.visual_projection(self.vision_model(pixels))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> dict:
        """pixels [B, C, H, W], tokens [B, T] -> {"image_features" [B, D], "text_features" [B, D] (unit
        length), "logit_scale" [1] (exponentiated, capped), "logit_bias" [1] (SigLIP)}."""
        return self._output("image_features", self.encode_image(pixels, normalize=True), tokens)
