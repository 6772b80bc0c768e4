"""Drop-in patch embeddings on `mmfast.ops.patch_embed`: timm's `PatchEmbed`, HF's
`CLIPVisionEmbeddings` / `SiglipVisionEmbeddings`, VideoMAE's tubelets and AST's embeddings.

Each keeps its peer's constructor arguments, attribute names and state_dict keys (checkpoints
load unchanged) and its outputs; `from_peer(module)` builds one around an existing module's
parameters. Extras, all optional: `mean`/`std` fuse the input normalization (feed uint8 pixels
straight from the decoder), and `backend` picks the op's backend.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.ops.patch_embed import patch_embed

_FORMATS = ("NCHW", "NHWC", "NCL", "NLC")


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def interpolate_positions(table: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a `[gh * gw, E]` position table to a new grid, as HF's
    `interpolate_pos_encoding` does (align_corners=False, no antialias)."""
    dim = table.shape[-1]
    square = table.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square.float(), size=new_grid, mode="bicubic", align_corners=False)
    return resized.to(table.dtype).permute(0, 2, 3, 1).reshape(-1, dim)


def _wrapping(cls, peer: nn.Module, extras: dict, names: tuple[str, ...], normalizes: bool = True):
    """A `cls` module that shares `peer`'s attributes and submodules `names` (the same parameters, so
    an optimizer's state stays valid), with from_peer's `backend=` (and `mean=`, `std=`) extras."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name in names:
        setattr(module, name, getattr(peer, name))
    module.backend = extras.get("backend")
    if normalizes:
        module.mean, module.std = extras.get("mean"), extras.get("std")
    return module


class _PositionCache:
    """Interpolated position tables per input size, reused while they need no gradient
    (inference, or a frozen table); recomputed (differentiably) in training."""

    def __init__(self):
        self.entries: dict = {}

    def get(self, table: torch.Tensor, grid, new_grid) -> torch.Tensor:
        if table.requires_grad and torch.is_grad_enabled():
            return interpolate_positions(table, grid, new_grid)
        key = (tuple(new_grid), table.data_ptr(), table._version, table.dtype, table.device)
        if key not in self.entries:
            self.entries = {key: interpolate_positions(table.detach(), grid, new_grid)}  # keep one size
        return self.entries[key]


class PatchEmbed(nn.Module):
    """timm's `PatchEmbed` (2-D image to patch embedding) on the fused op."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, norm_layer=None,
                 flatten: bool = True, output_fmt: str | None = None, bias: bool = True,
                 strict_img_size: bool = True, dynamic_img_pad: bool = False, device=None, dtype=None, *,
                 mean=None, std=None, backend: str | None = None):
        super().__init__()
        _register_with_timm()
        self.patch_size = _pair(patch_size)
        self.img_size = None if img_size is None else _pair(img_size)
        self.grid_size = None if img_size is None else tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = None if img_size is None else self.grid_size[0] * self.grid_size[1]
        if output_fmt is not None:
            if str(output_fmt).split(".")[-1] not in _FORMATS:
                raise ValueError(f"output_fmt must be one of {_FORMATS}, got {output_fmt!r}")
            self.flatten, self.output_fmt = False, str(output_fmt).split(".")[-1]
        else:
            self.flatten, self.output_fmt = flatten, "NCHW"
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias,
                              device=device, dtype=dtype)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self.mean, self.std, self.backend = mean, std, backend

    @classmethod
    def from_peer(cls, peer: nn.Module, **extras) -> "PatchEmbed":
        """Wraps a timm PatchEmbed's own proj and norm modules (same parameters)."""
        _register_with_timm()
        module = _wrapping(cls, peer, extras, ("patch_size", "img_size", "grid_size", "num_patches", "flatten",
                                               "strict_img_size", "dynamic_img_pad", "proj", "norm"))
        module.output_fmt = str(getattr(peer.output_fmt, "value", peer.output_fmt))
        return module

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size):
        return _grid(img_size, self.patch_size, self.dynamic_img_pad)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's API: a new input size, and a new patch size with the kernel resampled as timm does
        (its resample_patch_embed, FlexiViT's pseudo-inverse resize; needs timm)."""
        if patch_size is not None and _pair(patch_size) != self.patch_size:
            try:
                from timm.layers import resample_patch_embed
            except ImportError as error:
                raise ImportError("PatchEmbed.set_input_size(patch_size=...) resamples the kernel with timm's "
                                  "resample_patch_embed: pip install timm") from error
            new_size = _pair(patch_size)
            old = self.proj
            self.proj = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=new_size, stride=new_size,
                                  bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                self.proj.weight.copy_(resample_patch_embed(old.weight, list(new_size)))
                if old.bias is not None:
                    self.proj.bias.copy_(old.bias)
            self.proj.weight.requires_grad_(old.weight.requires_grad)
            self.proj.train(old.training)
            self.patch_size = new_size
        if img_size is not None or patch_size is not None:
            self.img_size = _pair(img_size) if img_size is not None else self.img_size
            if self.img_size is not None:
                self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
                self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """x: `[B, C, H, W]` (`[B, H, W, C]` with channels_last), float or uint8."""
        return self.norm(self._embed(x, channels_last))

    @torch.jit.ignore  # the fused op is no TorchScript: a scripted model calls it as Python
    def _embed(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        # (only attributes and plain functions here: a scripted model passes its script module as self)
        height, width = (x.shape[1:3] if channels_last else x.shape[2:4]) if x.dim() == 4 else (None, None)
        if height is not None and self.img_size is not None:
            _check_size(tuple(self.img_size), tuple(self.patch_size), self.strict_img_size, self.dynamic_img_pad,
                        height, width)
        tokens = patch_embed(x, self.proj.weight, self.proj.bias, mean=self.mean, std=self.std,
                             channels_last=channels_last, dynamic_pad=self.dynamic_img_pad, backend=self.backend)
        if not self.flatten:
            grid = _grid((height, width), self.patch_size, self.dynamic_img_pad)
            image = tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])
            tokens = {"NCHW": lambda: image.permute(0, 3, 1, 2), "NHWC": lambda: image,
                      "NCL": lambda: tokens.transpose(1, 2), "NLC": lambda: tokens}[self.output_fmt]()
        return tokens


_registered_with_timm = []


def _register_with_timm() -> None:
    """Where timm is in use, registers PatchEmbed as a leaf of timm's FX tracing (feature extraction,
    its FX tests): the fused op branches on input shapes, which symbolic tracing cannot follow."""
    if not _registered_with_timm and "timm" in sys.modules:
        from timm.layers import register_notrace_module

        register_notrace_module(PatchEmbed)
        _registered_with_timm.append(True)


def _grid(img_size, patch_size, dynamic_pad: bool) -> tuple:
    if dynamic_pad:
        return tuple(math.ceil(s / p) for s, p in zip(img_size, patch_size))
    return tuple(s // p for s, p in zip(img_size, patch_size))


def _check_size(img_size, patch_size, strict: bool, dynamic_pad: bool, height: int, width: int) -> None:
    if strict and (height, width) != img_size:
        raise ValueError(f"PatchEmbed: input size ({height}, {width}) doesn't match the model's {img_size} "
                         "(strict_img_size=True)")
    if not strict and not dynamic_pad and (height % patch_size[0] or width % patch_size[1]):
        raise ValueError(f"PatchEmbed: input size ({height}, {width}) must be divisible by the patch size "
                         f"{patch_size} (or set dynamic_img_pad=True)")


# TorchScript reads the ignored _embed's signature from its annotations, which this module's
# `from __future__ import annotations` turns into strings it cannot resolve: give it the types.
PatchEmbed._embed.__annotations__ = {"x": torch.Tensor, "channels_last": bool, "return": torch.Tensor}


class _HFVisionEmbeddings(nn.Module):
    """HF's CLIP / SigLIP vision embeddings: Conv2d patches, optional class token, positions."""

    class_token = True

    def __init__(self, config, *, mean=None, std=None, stride: int | None = None, backend: str | None = None):
        """stride (mmfast's option, not HF's): patches every `stride` pixels, overlapping when smaller
        than the patch size (AST's way); None is HF's stride, the patch size."""
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.patch_stride = stride or config.patch_size
        if self.class_token:
            self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_stride, bias=not self.class_token)
        self.num_patches = self._side(self.image_size) ** 2
        self.num_positions = self.num_patches + int(self.class_token)
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)
        self.mean, self.std, self.backend = mean, std, backend
        self._positions = _PositionCache()

    @classmethod
    def from_peer(cls, peer: nn.Module, **extras):
        """Wraps an HF embeddings module's own parameters."""
        module = _wrapping(cls, peer, extras, ("config", "embed_dim", "image_size", "patch_size", "num_patches",
                                               "num_positions", "patch_embedding", "position_embedding")
                           + (("class_embedding",) if cls.class_token else ()))
        module.register_buffer("position_ids", peer.position_ids, persistent=False)
        module._positions = _PositionCache()
        module.patch_stride = module.patch_size
        return module

    def _side(self, pixels: int) -> int:
        """Patches along a side of `pixels` (a Conv's count: leftover pixels are dropped)."""
        return (pixels - self.patch_size) // self.patch_stride + 1

    def _position_table(self, height: int, width: int, interpolate: bool) -> torch.Tensor:
        table = self.position_embedding.weight
        grid = (self._side(height), self._side(width))
        side = int(math.isqrt(self.num_patches))
        if not interpolate or (grid[0] * grid[1] == self.num_patches and height == width):
            return table
        prefix = int(self.class_token)
        patches = self._positions.get(table[prefix:], (side, side), grid)
        return torch.cat([table[:prefix], patches]) if prefix else patches

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [B, C, H, W] (uint8, normalized with mean/std, or float) -> [B, (1 +) N, hidden];
        keep (mmfast's, for masked autoencoders): [B, K] patch indices, only those embedded -> [B, (1 +) K, hidden]."""
        height, width = pixel_values.shape[-2:]
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model "
                             f"({self.image_size}*{self.image_size}).")
        return patch_embed(pixel_values, self.patch_embedding.weight, self.patch_embedding.bias,
                           pos_embed=self._position_table(height, width, interpolate_pos_encoding),
                           cls_token=self.class_embedding if self.class_token else None, stride=self.patch_stride,
                           mean=self.mean, std=self.std, keep=keep, backend=self.backend)


class CLIPVisionEmbeddings(_HFVisionEmbeddings):
    """HF `CLIPVisionEmbeddings`: class token + Conv2d patches (no bias) + learned positions."""

    class_token = True


class SiglipVisionEmbeddings(_HFVisionEmbeddings):
    """HF `SiglipVisionEmbeddings`: Conv2d patches (with bias) + learned positions, no class token."""

    class_token = False


class TubeletEmbed(nn.Module):
    """VideoMAE's patch embeddings (`VideoMAEPatchEmbeddings`): Conv3d tubelets of
    tubelet_size x patch x patch, input `[B, T, C, H, W]` (or `[B, T, H, W, C]` with channels_last,
    as video decoders deliver uint8 frames), output `[B, N, E]`. `position_embeddings` (`[N, E]`,
    e.g. VideoMAE's sinusoid table) can be added in the same pass. stride (mmfast's; not in VideoMAE): the
    spatial step of the tubelets, smaller than patch_size for overlapping ones (None: patch_size)."""

    def __init__(self, image_size=224, patch_size=16, num_channels: int = 3, hidden_size: int = 768,
                 num_frames: int = 16, tubelet_size: int = 2, *, stride=None, mean=None, std=None,
                 backend: str | None = None):
        super().__init__()
        self.image_size, self.patch_size = _pair(image_size), _pair(patch_size)
        self.stride = self.patch_size if stride is None else _pair(stride)
        self.tubelet_size, self.num_channels = int(tubelet_size), num_channels
        places = [(size - patch) // step + 1 for size, patch, step in zip(self.image_size, self.patch_size, self.stride)]
        self.num_patches = places[0] * places[1] * (num_frames // self.tubelet_size)
        kernel = (self.tubelet_size, *self.patch_size)
        self.projection = nn.Conv3d(num_channels, hidden_size, kernel_size=kernel,
                                    stride=(self.tubelet_size, *self.stride))
        self.mean, self.std, self.backend = mean, std, backend

    @classmethod
    def from_config(cls, config, **extras) -> "TubeletEmbed":
        return cls(config.image_size, config.patch_size, config.num_channels, config.hidden_size, config.num_frames,
                   config.tubelet_size, **extras)

    @classmethod
    def from_peer(cls, peer: nn.Module, **extras) -> "TubeletEmbed":
        return _wrapping(cls, peer, extras, ("image_size", "patch_size", "tubelet_size", "num_channels",
                                             "num_patches", "projection"))

    def forward(self, pixel_values: torch.Tensor, position_embeddings: torch.Tensor | None = None, *,
                channels_last: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep (mmfast's, for masked autoencoders): [B, K] tubelet indices, only those embedded."""
        if pixel_values.dim() != 5:
            raise ValueError(f"TubeletEmbed: pixel_values must be [B, T, C, H, W], got {tuple(pixel_values.shape)}")
        video = pixel_values.permute(0, 4, 1, 2, 3) if channels_last else pixel_values.permute(0, 2, 1, 3, 4)
        if video.shape[1] != self.num_channels:
            raise ValueError(f"TubeletEmbed: expected {self.num_channels} channels, got {video.shape[1]} "
                             f"(pixel_values shape {tuple(pixel_values.shape)})")
        if tuple(video.shape[-2:]) != tuple(self.image_size):
            raise ValueError(f"TubeletEmbed: input image size {tuple(video.shape[-2:])} doesn't match model "
                             f"{tuple(self.image_size)}")
        return patch_embed(video, self.projection.weight, self.projection.bias, pos_embed=position_embeddings,
                           stride=self.projection.stride, mean=self.mean, std=self.std, keep=keep,
                           backend=self.backend)


class _ASTProjection(nn.Module):
    """Holds `projection` so state_dict keys match HF's `patch_embeddings.projection.*`."""

    def __init__(self, hidden_size: int, patch_size: int, frequency_stride: int, time_stride: int):
        super().__init__()
        self.projection = nn.Conv2d(1, hidden_size, kernel_size=(patch_size, patch_size),
                                    stride=(frequency_stride, time_stride))


class ASTPatchEmbed(nn.Module):
    """AST's embeddings (`ASTEmbeddings`): overlapping 16x16 patches of the spectrogram at strides
    (frequency_stride, time_stride), class and distillation tokens, learned positions, dropout.
    Input `[B, time, mel bins]`, output `[B, N + 2, E]`."""

    def __init__(self, hidden_size: int = 768, patch_size: int = 16, frequency_stride: int = 10,
                 time_stride: int = 10, num_mel_bins: int = 128, max_length: int = 1024,
                 hidden_dropout_prob: float = 0.0, *, backend: str | None = None):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.patch_embeddings = _ASTProjection(hidden_size, patch_size, frequency_stride, time_stride)
        frequencies = (num_mel_bins - patch_size) // frequency_stride + 1
        times = (max_length - patch_size) // time_stride + 1
        self.position_embeddings = nn.Parameter(torch.zeros(1, frequencies * times + 2, hidden_size))
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.backend = backend

    @classmethod
    def from_config(cls, config, **extras) -> "ASTPatchEmbed":
        return cls(config.hidden_size, config.patch_size, config.frequency_stride, config.time_stride,
                   config.num_mel_bins, config.max_length, config.hidden_dropout_prob, **extras)

    @classmethod
    def from_peer(cls, peer: nn.Module, **extras) -> "ASTPatchEmbed":
        return _wrapping(cls, peer, extras, ("cls_token", "distillation_token", "patch_embeddings",
                                             "position_embeddings", "dropout"), normalizes=False)

    def forward(self, input_values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep (mmfast's, for masked autoencoders): [B, K] patch indices, only those embedded."""
        if input_values.dim() != 3:
            raise ValueError(f"ASTPatchEmbed: input_values must be [B, time, mel bins], got {tuple(input_values.shape)}")
        spectrogram = input_values.unsqueeze(1).transpose(2, 3)  # [B, 1, mel bins, time], a view
        projection = self.patch_embeddings.projection
        prefix = torch.cat([self.cls_token, self.distillation_token], dim=1)
        tokens = patch_embed(spectrogram, projection.weight, projection.bias, stride=projection.stride,
                             pos_embed=self.position_embeddings, cls_token=prefix, keep=keep, backend=self.backend)
        return self.dropout(tokens)
