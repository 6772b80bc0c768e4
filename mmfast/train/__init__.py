"""Training components. So far: gradient caching for large contrastive batches (grad_cache)."""
from mmfast.train.grad_cache import grad_cache_step

__all__ = ["grad_cache_step"]
