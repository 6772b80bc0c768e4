"""mmfast: fused kernels and training components for multimodal models."""
from mmfast import nn, ops

__version__ = "0.1.0"

__all__ = ["ops", "nn", "load", "load_clip", "load_llava", "load_unified", "__version__"]


def __getattr__(name: str):
    if name in ("load", "load_clip", "load_llava", "load_unified"):  # lazily: they pull in the trainer's tasks, tokenizer and checkpoints
        from mmfast.train import load as loading

        return getattr(loading, name)
    raise AttributeError(f"module 'mmfast' has no attribute {name!r}")
