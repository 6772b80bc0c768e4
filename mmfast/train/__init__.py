"""Training: run configuration (recipes + overrides), engines (single, DDP, FSDP2, DeepSpeed ZeRO),
the contrastive trainer, evaluation, checkpoints, and gradient caching for large contrastive batches."""
from mmfast.train.config import RunConfig, load_config
from mmfast.train.grad_cache import grad_cache_step
from mmfast.train.trainer import train

__all__ = ["RunConfig", "grad_cache_step", "load_config", "train"]
