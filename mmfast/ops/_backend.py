"""Backend selection shared by every op.

`backend=` on the op wins, then the MMFAST_BACKEND environment variable, then "auto".
"auto" picks the Triton kernels on CUDA tensors and the PyTorch path elsewhere, and
logs once per op when it falls back. Nothing swaps silently.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

BACKENDS = ("auto", "triton", "native", "reference")
ALIASES = {"cuda": "native"}  # the csrc extension's name before 2026-11-27 (it runs on CPU tensors too)
logger = logging.getLogger("mmfast")
_fallbacks_logged: set[tuple[str, str]] = set()


def profiled(function):
    """The op under its own name in torch.profiler traces ("mmfast.patch_embed"), so a trace says which
    mmfast op a kernel belongs to (Triton kernels' own names, like "_fwd_kernel", do not)."""
    label = f"mmfast.{function.__name__}"

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if not torch.autograd._profiler_enabled():  # the common case: no record object per call
            return function(*args, **kwargs)
        with torch.profiler.record_function(label):
            return function(*args, **kwargs)
    return wrapper


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# The SM count of the GPU the launchers plan for while mmfast.bench.compile records their launches
# for an ahead-of-time compile on a machine without one; None otherwise.
_planning_for_sm_count: int | None = None


def plans_for_gpu(device: torch.device) -> bool:
    """Whether launchers pick the tile sizes of a real GPU compile: on CUDA tensors outside the
    interpreter, and while mmfast.bench.compile records launches for a GPU target."""
    return _planning_for_sm_count is not None or (device.type == "cuda" and not triton_interpreting())


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU a launcher sizes its grid for."""
    if _planning_for_sm_count is not None:
        return _planning_for_sm_count
    return torch.cuda.get_device_properties(device).multi_processor_count


def log_fallback(op: str, reason: str) -> None:
    """Says once per op and reason (logger "mmfast", INFO) that "auto" runs the PyTorch path."""
    if (op, reason) not in _fallbacks_logged:
        _fallbacks_logged.add((op, reason))
        logger.info("mmfast.%s: using the PyTorch path (%s)", op, reason)


def resolve_backend(op: str, backend: str | None, device: torch.device, implemented: tuple[str, ...],
                    cpu_kernel_ready=None) -> str:
    """Returns the concrete backend ("triton", "native" or "reference") for `op` on `device`.

    "native" is the csrc extension (C++ on CPU tensors, CUDA C++ on GPU tensors; "cuda" is accepted
    for it). cpu_kernel_ready: for ops with such a kernel, a callable telling whether it is built;
    "auto" then prefers it on the CPU.
    """
    source = "backend"
    if backend is None:
        backend, source = os.environ.get("MMFAST_BACKEND", "auto"), "MMFAST_BACKEND"
    backend = ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: {source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and "triton" in implemented and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_kernel_ready is not None and cpu_kernel_ready():
            return "native"
        log_fallback(op, "tensors are on " + device.type if device.type != "cuda" else "triton is not installed")
        return "reference"
    if backend not in implemented:
        raise ValueError(f"{op}: {source}={backend!r} is not implemented for this op; available: {implemented}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package (pip install 'mmfast[triton]')")
        if device.type != "cuda" and not triton_interpreting() and _planning_for_sm_count is None:
            raise RuntimeError(
                f"{op}: backend 'triton' got tensors on {device.type}; Triton kernels need CUDA tensors, "
                "or TRITON_INTERPRET=1 set before triton is imported to run them in Triton's interpreter"
            )
    return backend
