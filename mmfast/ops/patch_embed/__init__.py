"""Fused patch embedding: uint8 or float pixels -> normalize -> patches -> projection + bias +
position embedding (+ class/prefix tokens), for images, video tubelets and spectrograms."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from mmfast.ops._backend import profiled, resolve_backend
from mmfast.ops._validation import FLOAT_DTYPES

__all__ = ["patch_embed", "PatchGeometry", "patch_grid"]

_IMPLEMENTED = ("triton", "reference")
OP = "patch_embed"


@dataclass(frozen=True)
class PatchGeometry:
    """Where patches sit, over (time, height, width); images have time 1."""

    video: bool
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]  # zeros added after the end of each dimension (normalized space)
    grid: tuple[int, int, int]
    channels: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def patch_size(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1] * self.kernel[2]


def _triple(name: str, value, spatial: int, default) -> tuple[int, int, int]:
    if value is None:
        value = default
    def whole(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if whole(value):
        value = (value,) * spatial
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) != spatial or not all(whole(v) and v >= 1
                                                                                        for v in value):
        raise ValueError(f"{OP}: {name} must be a positive int or {spatial} positive ints, got {value!r}")
    value = tuple(int(v) for v in value)
    return value if spatial == 3 else (1, *value)


def patch_grid(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dynamic_pad: bool):
    """(padding, grid) per dimension: padding makes every pixel fall in a patch (timm's
    dynamic_img_pad); without it the grid floors as a convolution does."""
    padding, grid = [], []
    for length, k, s in zip(size, kernel, stride):
        pad = 0
        if dynamic_pad:
            pad = max(k - length, 0) if length <= k else (-(length - k)) % s
        if length + pad < k:
            raise ValueError(f"{OP}: pixels of size {tuple(size)} are smaller than the patch {tuple(kernel)}")
        padding.append(pad)
        grid.append((length + pad - k) // s + 1)
    return tuple(padding), tuple(grid)


def _channel_vector(name, value, channels, device, default):
    if value is None:
        return torch.full((channels,), default, device=device, dtype=torch.float32)
    if isinstance(value, torch.Tensor) and value.device.type not in ("cpu", device.type):
        raise ValueError(f"{OP}: {name} must be on the CPU or {device}, got {value.device}")
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError(type(value).__name__)
        vector = torch.as_tensor(value, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{OP}: {name} must be a number, a sequence of numbers or a tensor, got {value!r}") from None
    if vector.numel() == 1:
        vector = vector.expand(channels)
    if vector.numel() != channels:
        raise ValueError(f"{OP}: {name} must have one value per channel ({channels}), got {vector.numel()}")
    # a zero or negative std makes every output NaN or inf (checked where it costs no GPU synchronization)
    if name == "std" and vector.device.type == "cpu" and not bool((vector > 0).all()):
        raise ValueError(f"{OP}: std must be > 0 for every channel, got {vector.tolist()}")
    return vector.to(device).contiguous()


def _rows(name: str, tensor, embed_dim: int, device, dtype=None):
    """[R, E] view of a [R, E] / [1, R, E] (or [E] / [1, 1, E] for one row) tensor."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"{OP}: {name} must be a float tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if tensor.device != device:
        raise ValueError(f"{OP}: {name} must be on {device}, got {tensor.device}")
    rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 0 else tensor
    if tensor.dim() not in (1, 2, 3) or (tensor.dim() == 3 and tensor.shape[0] != 1) or rows.shape[-1] != embed_dim:
        raise ValueError(f"{OP}: {name} must be [R, {embed_dim}] or [1, R, {embed_dim}], got {tuple(tensor.shape)}")
    return rows


@profiled
def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                stride=None, pos_embed: torch.Tensor | None = None, cls_token: torch.Tensor | None = None,
                mean=None, std=None, channels_last: bool = False, dynamic_pad: bool = False,
                keep: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Patch embedding in one pass. Returns `[B, P + N, E]` in weight's dtype (`[B, P + K, E]` with keep).

    pixels: images `[B, C, H, W]` (`[B, H, W, C]` with channels_last) or video `[B, C, T, H, W]`
        (`[B, T, H, W, C]`), uint8 (scaled by 1/255) or float; any strides, so transposed views
        (AST's `[B, 1, F, T]`) cost no copy.
    weight: the Conv2d/Conv3d weight `[E, C, (t,) kh, kw]` (checkpoints load unchanged); the patch
        size comes from it. bias: `[E]` or None.
    stride: the patch step, default the patch size; smaller strides give overlapping patches (AST).
    pos_embed: `[N, E]` or `[1, N, E]` added to the patch rows; with P + N rows the first P are the
        prefix tokens' positions (timm with a class token, HF CLIP).
    cls_token: prefix tokens `[E]`, `[P, E]` or `[1, P, E]` (a class token; AST's class and
        distillation tokens), written before the patch rows.
    mean, std: per-channel normalization applied after the 1/255 scaling (e.g. ImageNet's), as
        sequences or tensors of C values (or one value for all).
    dynamic_pad: zero-pad (after normalization) the end of each dimension so every pixel falls in a
        patch, as timm's `dynamic_img_pad`; otherwise leftover pixels are dropped as a Conv does.
    keep: integer `[B, K]`, the patches each sample keeps (indices into the row-major (t, h, w) grid,
        in the order they are written), as masked autoencoders keep a random share: only those are
        gathered, normalized and projected, each with its own position. None keeps all N.
    Gradients flow to weight, bias, pos_embed, cls_token and float pixels. Under `torch.autocast`
    a float32 weight (and bias, positions, prefix) is cast to autocast's dtype, as nn.Conv2d's is.
    """
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"{OP}: pixels must be a torch.Tensor, got {type(pixels).__name__}")
    if pixels.dtype != torch.uint8 and pixels.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: pixels must be uint8 or float32/float16/bfloat16, got {pixels.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: weight must be a float tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    if pixels.dim() not in (4, 5):
        raise ValueError(f"{OP}: pixels must be 4-D images or 5-D video, got shape {tuple(pixels.shape)}")
    if weight.dim() != pixels.dim():
        raise ValueError(f"{OP}: weight must be the {'Conv3d' if pixels.dim() == 5 else 'Conv2d'} layout "
                         f"[E, C, {'t, ' if pixels.dim() == 5 else ''}kh, kw] ({pixels.dim()}-D) for "
                         f"{pixels.dim()}-D pixels, got shape {tuple(weight.shape)}")
    if pixels.device != weight.device:
        raise ValueError(f"{OP}: pixels and weight must be on one device, got {pixels.device} and {weight.device}")
    video = pixels.dim() == 5
    if channels_last:
        pixels = pixels.movedim(-1, 1)
    view = pixels if video else pixels.unsqueeze(2)  # [B, C, T, H, W]
    channels, embed_dim = view.shape[1], weight.shape[0]
    if weight.shape[1] != channels:
        raise ValueError(f"{OP}: pixels have {channels} channels but weight expects {weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)}, pixels shape {tuple(pixels.shape)})")
    if view.shape[0] == 0:
        raise ValueError(f"{OP}: pixels must hold at least one sample, got shape {tuple(pixels.shape)}")
    kernel = tuple(weight.shape[2:]) if video else (1, *weight.shape[2:])
    stride = _triple("stride", stride, 3 if video else 2, kernel if video else kernel[1:])
    padding, grid = patch_grid(view.shape[2:], kernel, stride, dynamic_pad)
    geometry = PatchGeometry(video, kernel, stride, padding, grid, channels)

    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (embed_dim,)):
        raise ValueError(f"{OP}: bias must be [{embed_dim}], got {getattr(bias, 'shape', type(bias).__name__)}")
    if bias is not None and (bias.device != weight.device or not bias.is_floating_point()):
        raise ValueError(f"{OP}: bias must be a float tensor on the weight's device {weight.device}, got "
                         f"{bias.dtype} on {bias.device}")
    prefix = _rows("cls_token", cls_token, embed_dim, view.device)
    positions = _rows("pos_embed", pos_embed, embed_dim, view.device)
    prefix_count = 0 if prefix is None else prefix.shape[0]
    if positions is not None and positions.shape[0] not in (geometry.num_patches, geometry.num_patches + prefix_count):
        expected = f"{geometry.num_patches}" + (f" or {geometry.num_patches + prefix_count}" if prefix_count else "")
        raise ValueError(f"{OP}: pos_embed must have {expected} rows for a {grid} patch grid, "
                         f"got {positions.shape[0]} (interpolate it for this input size)")
    keep = _kept_patches(keep, view.shape[0], geometry.num_patches, view.device)
    mean_vector = _channel_vector("mean", mean, channels, view.device, 0.0)
    inv_std = 1.0 / _channel_vector("std", std, channels, view.device, 1.0)
    in_scale = 1.0 / 255.0 if pixels.dtype == torch.uint8 else 1.0

    device_type = view.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        # as nn.Conv2d under autocast: compute in autocast's dtype, gradients return in float32
        dtype = torch.get_autocast_dtype(device_type)
        weight, bias, positions, prefix = (None if t is None else t.to(dtype) for t in (weight, bias, positions, prefix))
        with torch.autocast(device_type, enabled=False):
            return _dispatch(view, weight, bias, positions, prefix, mean_vector, inv_std, in_scale, geometry, keep,
                             backend)
    return _dispatch(view, weight, bias, positions, prefix, mean_vector, inv_std, in_scale, geometry, keep, backend)


def _kept_patches(keep, batch: int, num_patches: int, device) -> torch.Tensor | None:
    if keep is None:
        return None
    if not isinstance(keep, torch.Tensor) or keep.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OP}: keep must be an int32 or int64 tensor of patch indices, got "
                        f"{getattr(keep, 'dtype', type(keep).__name__)}")
    if keep.dim() != 2 or keep.shape[0] != batch or not 1 <= keep.shape[1] <= num_patches:
        raise ValueError(f"{OP}: keep must be [B={batch}, K] with 1 <= K <= {num_patches} (the patches per "
                         f"sample), got shape {tuple(keep.shape)}")
    if keep.device != device:
        raise ValueError(f"{OP}: keep must be on the pixels' device {device}, got {keep.device}")
    # out-of-range indices would read outside the image (checked where it costs no GPU synchronization;
    # the kernels write zero rows for them)
    if keep.device.type == "cpu" and not bool(((keep >= 0) & (keep < num_patches)).all()):
        raise ValueError(f"{OP}: keep indices must lie in [0, {num_patches}), got values from "
                         f"{int(keep.min())} to {int(keep.max())}")
    return keep.to(torch.int64).contiguous()


def _dispatch(view, weight, bias, positions, prefix, mean_vector, inv_std, in_scale, geometry, keep, backend):
    if resolve_backend(OP, backend, view.device, _IMPLEMENTED) == "triton":
        from mmfast.ops.patch_embed.function import PatchEmbedFunction

        return PatchEmbedFunction.apply(view, weight, bias, positions, prefix, mean_vector, inv_std, in_scale,
                                        geometry, keep)
    from mmfast.ops.patch_embed import reference

    out = reference.forward(view, weight, bias, positions, prefix, mean_vector, inv_std, in_scale, geometry,
                            keep=keep)
    return out.to(weight.dtype)
