"""Builds the optional C++/CUDA extension `mmfast._C` from csrc/.

Everything else is declared in pyproject.toml. Without C++ sources, a compiler or
CUDA, the install still succeeds and mmfast runs on Triton and PyTorch.

Environment:
  MMFAST_SKIP_EXTENSION=1   never build the extension
  MMFAST_CUDA_ARCHS="9.0"   CUDA architectures to build for (TORCH_CUDA_ARCH_LIST)
  MAX_JOBS=N                parallel compile jobs (default: bounded by free memory)
"""
import glob
import os

from setuptools import setup


def extension_modules():
    if os.environ.get("MMFAST_SKIP_EXTENSION") == "1":
        return [], {}
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("mmfast: torch is not importable at build time, skipping the extension")
        return [], {}
    if "MAX_JOBS" not in os.environ:
        # A CUDA translation unit can take several GB to compile.
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gb // 4))))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if "MMFAST_CUDA_ARCHS" in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["MMFAST_CUDA_ARCHS"]
    # CUDA sources need a GPU to pick architectures from, or an explicit list
    targets_known = torch.cuda.is_available() or "TORCH_CUDA_ARCH_LIST" in os.environ
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and torch.version.cuda and targets_known
    builder = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    module = builder(
        "mmfast._C",
        sources + (cuda_sources if use_cuda else []),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """The extension is optional: a failed build leaves mmfast on Triton and PyTorch (and the
        extension compiles on first use instead)."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # any compiler or toolkit problem
                print(f"mmfast: the C++ extension was not built ({type(error).__name__}: {error}); "
                      "it will be compiled on first use of backend='cuda' if possible")

    return [module], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
