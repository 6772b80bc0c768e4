"""What this machine has: versions, devices, GPU clocks and power, usable backends and extras.
Shared by `mmfast info` and the rows the benchmarks write."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess

import torch

from mmfast.ops._backend import triton_available, triton_interpreting

OPTIONAL_PACKAGES = ("triton", "open_clip_torch", "timm", "transformers", "librosa", "deepspeed", "bitsandbytes",
                     "tensorboard", "webdataset", "tokenizers", "matplotlib", "nvidia-ml-py", "pytest-benchmark",
                     "peft", "diffusers")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The checkout's commit; MMFAST_GIT_COMMIT names it where the tree was copied without .git (a GPU lease)."""
    if os.environ.get("MMFAST_GIT_COMMIT"):
        return os.environ["MMFAST_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def gpu_state(index: int = 0) -> dict:
    """Name, SM and memory clocks (MHz) and power draw and limit (W) from NVML, where available."""
    if not torch.cuda.is_available():
        return {}
    state = {"gpu": torch.cuda.get_device_name(index)}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        state.update(
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            memory_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            power_limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
        )
    except Exception as error:  # NVML missing or not permitted: the row still carries the name
        state["nvml"] = f"unavailable ({type(error).__name__})"
    return state


def _extension_state() -> str:
    from mmfast import _extension

    if importlib.util.find_spec("mmfast._C") is not None:
        return "built at install (mmfast._C)"
    return "compiled on first use (cached)" if _extension.loaded() else "not built (compiles on first use of backend 'native')"


def describe() -> dict:
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    backends = ["reference"]
    if triton_available() and (devices or triton_interpreting()):
        backends.append("triton" + ("" if devices else " (interpreter)"))
    return {
        "mmfast": package_version("mmfast"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "git_commit": git_commit(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "devices": devices or ["cpu"],
        "backends": backends,
        "mmfast_backend": os.environ.get("MMFAST_BACKEND", "auto"),
        "extension": _extension_state(),
        "optional_packages": {name: package_version(name) for name in OPTIONAL_PACKAGES},
    }
