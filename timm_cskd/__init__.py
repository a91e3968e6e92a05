"""timm-cskd: Class-wise Self-Knowledge Distillation (Yun et al., CVPR 2020) for timm models."""

from timm_cskd.loss import CSKDLoss, cskd_loss
from timm_cskd.sampler import ClassPairSampler, ShuffledBatchSampler

__all__ = ["CSKDLoss", "ClassPairSampler", "cskd_loss", "ShuffledBatchSampler"]
__version__ = "0.1.0"
