from mmfast.nn.contrastive import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
