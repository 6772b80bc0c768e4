"""mmfast: fused kernels and training components for multimodal models."""
from mmfast import nn, ops

__version__ = "0.1.0"

__all__ = ["ops", "nn", "load_clip", "__version__"]


def __getattr__(name: str):
    if name == "load_clip":  # lazily: it pulls in the trainer's tokenizer and checkpoint code
        from mmfast.train.load import load_clip

        return load_clip
    raise AttributeError(f"module 'mmfast' has no attribute {name!r}")
