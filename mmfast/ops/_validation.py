"""Argument checks for the public op boundary: each error names the argument,
what was expected and what came."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_features(op: str, name: str, tensor, *, ndim: int = 2) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def check_same(op: str, names: tuple[str, str], first: torch.Tensor, second: torch.Tensor) -> None:
    if first.device != second.device:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must be on one device, got {first.device} and {second.device}")
    if first.dtype != second.dtype:
        raise TypeError(f"{op}: {names[0]} and {names[1]} must have one dtype, got {first.dtype} and {second.dtype}")


def as_scalar_tensor(op: str, name: str, value, device: torch.device) -> torch.Tensor:
    """A python number or one-element float tensor on `device`, as a 0-d tensor (gradient kept)."""
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a float or a one-element tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{op}: {name} must have one element, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{op}: {name} must be a float tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the features, got {value.device}")
    return value.reshape(())
