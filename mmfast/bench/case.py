"""What a benchmark case is: a leaf module the suites and the harness both import."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

MODES = ("forward", "backward", "full")  # full = forward + backward
PROFILES = ("full", "quick", "cpu")


@dataclass
class Case:
    """One (operation, sizes, provider) to time.

    make() builds the inputs on the device and returns (step, leaves): step() runs the
    forward and returns the tensor to call .backward() on; leaves are the tensors whose
    .grad is cleared between repetitions. flops(mode) / bytes(mode) give the work used for
    TFLOP/s and GB/s (None where it does not apply); `rates` adds per-second figures of the
    suite's own (hours of audio per second). Rows of one `group` with the same mode
    are compared: each baseline's time divided by mmfast's.
    """

    suite: str
    group: str
    provider: str
    params: dict
    make: Callable[[], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]
    flops: Callable[[str], float] | None = None
    bytes: Callable[[str], float] | None = None
    modes: tuple[str, ...] = MODES
    is_mmfast: bool = field(default=False)
    rates: dict = field(default_factory=dict)  # name -> amount per step, reported per second
