"""Training: run configuration (recipes + overrides), the contrastive trainer, evaluation, and
gradient caching for large contrastive batches."""
from mmfast.train.config import RunConfig, load_config
from mmfast.train.grad_cache import grad_cache_step
from mmfast.train.trainer import train

__all__ = ["RunConfig", "grad_cache_step", "load_config", "train"]
