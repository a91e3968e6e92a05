"""AdaCos: cross-entropy on cosine logits whose scale adapts to the batch (Zhang et al., CVPR 2019).

Paper: `AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations`
    - https://arxiv.org/abs/1905.00292

    logits = s * cos(theta),  cos(theta_ik) = <x_i / ||x_i||, W_k / ||W_k||>
    s_0 = sqrt(2) * log(C - 1)                                   (the fixed AdaCos scale)
    B_avg = mean_i sum_{k != y_i} exp(s_{t-1} cos theta_ik)
    s_t = log(B_avg) / cos(min(pi / 4, median_i theta_{i, y_i}))   (dynamic AdaCos, no gradient)
    L = CE(s_t * cos(theta), y)

The timm classifier becomes a bias-free cosine head. Choices, as the unofficial reference
(4uiiurz1/pytorch-adacos) makes them where the paper leaves them open:

- the loss uses the scale just computed from this batch, whose statistics use the previous one;
- theta_med is the lower median (``torch.median``) of the target angles;
- ``s`` is a buffer of the head, so it is checkpointed, restored on resume and averaged by EMA, and it is
  updated only in training: evaluation gives the stored ``s`` times the cosines;
- under DDP, B_avg is averaged and theta_med taken over every rank's batch, so ``s`` stays identical on
  all ranks (each rank's batch has the same size: the samplers drop a last partial step).

The head runs in float32 with autocast off: exp(s cos) for s around 30 overflows float16.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.utils.model import unwrap_model

from timm_cskd.errors import ConfigError
from timm_cskd.methods import register
from timm_cskd.methods.base import Method, replace_linear_classifier

__all__ = ["AdaCos", "CosineHead"]


class CosineHead(nn.Module):
    """``s * cos`` between the L2-normalised features and class weights, in float32."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features, self.out_features = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("scale", torch.tensor(math.sqrt(2.0) * math.log(num_classes - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            cos = F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))
            # A copy: training updates the buffer in place before backward, which needs this step's s.
            return self.scale.clone() * cos

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _all_ranks(b_sum: torch.Tensor, count: int, target_angles: torch.Tensor):
    """The global sum of B over the global count, and every rank's target angles."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return b_sum / count, target_angles
    totals = torch.stack([b_sum, torch.tensor(float(count), device=b_sum.device)])
    dist.all_reduce(totals)
    gathered = [torch.empty_like(target_angles) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, target_angles)
    return totals[0] / totals[1], torch.cat(gathered)


@register
class AdaCos(Method):
    name = "adacos"
    formula = (
        "CE(s cos theta, y), cosine head, s <- log B_avg / cos(min(pi/4, theta_med)) per step without grad"
    )
    reference = "Zhang et al., CVPR 2019 (arXiv:1905.00292), dynamic AdaCos"
    mixup = False
    mixup_note = "the scale comes from each image's angle to its one true class, which a mixed image lacks"
    bce_loss = False
    bce_note = (
        "its adaptive scale s is derived for the softmax cross-entropy of cosine logits (from the sum of "
        "exp(s cos) over the other classes, the softmax's normaliser), which one sigmoid per class lacks"
    )

    @classmethod
    def adapt_model(cls, model: nn.Module, hp: dict) -> nn.Module:
        def cosine_head(classifier: nn.Linear) -> CosineHead:
            if classifier.out_features < 3:
                raise ConfigError(
                    "--method adacos needs 3 or more classes: its initial scale log(C - 1) is 0"
                )
            return CosineHead(classifier.in_features, classifier.out_features)

        return replace_linear_classifier(model, cls.name, cosine_head)

    @classmethod
    def export_state_dict(cls, state_dict: dict, hp: dict) -> dict:
        raise ValueError(
            "its cosine head divides each image's logits by that image's feature norm, which no Linear "
            "classifier of the plain timm architecture does; evaluate the training checkpoint itself "
            "(python -m timm_cskd.evaluate --checkpoint ...)"
        )

    def compute(self, input, target):
        logits = self.module(input)
        head = unwrap_model(self.module).get_classifier()
        # A copy, for the same reason as in the head; read after the forward, which under DDP first
        # broadcasts rank 0's buffers.
        scale = head.scale.clone()
        cos = logits / scale
        if self.training:
            with torch.no_grad():
                # The other classes' exp(s cos): the target column zeroed, not subtracted from the row sum
                # (which it dominates once learned, leaving rounding noise).
                b = torch.exp(scale * cos).scatter(1, target[:, None], 0.0).sum(1)
                # (s cos) / s can leave [-1, 1] by a rounding step.
                target_angle = torch.acos(cos.gather(1, target[:, None]).squeeze(1).clamp(-1.0, 1.0))
                b_avg, angles = _all_ranks(b.sum(), len(b), target_angle)
                scale = torch.log(b_avg) / torch.cos(angles.median().clamp(max=math.pi / 4))
                head.scale.copy_(scale)
        output = scale * cos
        ce = self.ce_weight * self.ce(output, target)
        return ce, {"ce": ce.detach()}, output, input
