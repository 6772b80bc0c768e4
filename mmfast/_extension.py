"""Finds, or compiles on first use, the C++/CUDA extension (csrc/) that registers `torch.ops.mmfast`.

`setup.py` builds `mmfast._C` at install time when it can; otherwise `load()` compiles csrc/ with
torch.utils.cpp_extension (the CPU sources, plus the CUDA ones when torch sees a GPU and nvcc is
there) and caches the library in TORCH_EXTENSIONS_DIR. MMFAST_SKIP_EXTENSION=1 turns it off.
"""
from __future__ import annotations

import glob
import importlib
import logging
import os

import torch

logger = logging.getLogger("mmfast")
SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_state = {"loaded": False, "looked": False}


def _build_name() -> str:
    from torch.utils import cpp_extension

    cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    return "mmfast_ops_cuda" if cuda else "mmfast_ops_cpu"


def _compiled_before() -> bool:
    """A library left by an earlier process's compile (torch.utils.cpp_extension's cache)."""
    try:
        from torch.utils import cpp_extension

        name = _build_name()
        directory = cpp_extension._get_build_directory(name, verbose=False)
        return os.path.exists(os.path.join(directory, f"{name}.so"))
    except Exception:  # a private helper of torch; without it, only an explicit load() compiles
        return False


def loaded() -> bool:
    """True when the ops are registered: a prebuilt `mmfast._C`, or an earlier compile in the cache
    (loaded, and rebuilt only if csrc/ changed since). Never compiles from scratch."""
    if not _state["loaded"] and not _state["looked"] and os.environ.get("MMFAST_SKIP_EXTENSION") != "1":
        _state["looked"] = True  # look once per process
        if not _import_prebuilt() and _compiled_before():
            _compile()
    return _state["loaded"]


def _import_prebuilt() -> bool:
    try:
        importlib.import_module("mmfast._C")
    except ImportError:
        return False
    _state["loaded"] = True
    return True


def load() -> bool:
    """Registers the ops, compiling csrc/ if needed (a minute or two, once). False if it cannot."""
    if _state["loaded"] or _import_prebuilt():
        return True
    if os.environ.get("MMFAST_SKIP_EXTENSION") == "1":
        return False
    return _compile()


def _compile() -> bool:
    sources = sorted(glob.glob(os.path.join(SOURCES, "*.cpp")))
    if not sources:
        return False
    from torch.utils import cpp_extension

    name = _build_name()
    cuda = name.endswith("cuda")
    if cuda:
        sources += sorted(glob.glob(os.path.join(SOURCES, "*.cu")))
    logger.info("mmfast: loading the C++%s extension (compiled on first use, cached afterwards)",
                "/CUDA" if cuda else "")
    cpp_extension.load(name=name, sources=sources, extra_cflags=["-O3"], extra_include_paths=[SOURCES],
                       is_python_module=False, verbose=False)
    _state["loaded"] = True
    return True
