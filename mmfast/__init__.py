"""mmfast: fused kernels and training components for multimodal models."""
from mmfast import ops, nn

__version__ = "0.1.0"

__all__ = ["ops", "nn", "__version__"]
