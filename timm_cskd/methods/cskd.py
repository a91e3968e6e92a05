"""CS-KD, Class-wise Self-Knowledge Distillation (Yun et al., CVPR 2020), in its two batch layouts.

Paper: `Regularizing Class-wise Predictions via Self-knowledge Distillation`
    - https://arxiv.org/abs/2003.13964

    L = CE(f(x), y) + lambda * T^2 * KL(softmax(f(x') / T) || softmax(f(x) / T)),  x' a classmate of x

Batches arrive as ``[x; x']``: a half, then same-class partners in the same order (ClassPairSampler).

- ``cskd`` (anchor layout): the paper's code (alinlab/cs-kd). Forward the anchors with grad, the partners
  under ``no_grad`` in train mode (so partner batches update BatchNorm statistics, as there), CE on the
  anchors only: about 1.33x the compute of cross-entropy.
- ``cskd-paired``: one forward over the whole batch, CE on both halves, each half distilled towards the
  other's detached prediction. The compute of cross-entropy.

With Mixup/CutMix (timm's ``Mixup`` in batch mode) the anchors are mixed and the KL target is the
partners' predictions mixed with the same lambda and permutation (the paper's Table 3).

With ``--bce-loss`` (timm's ResNet Strikes Back recipes) the CE term is timm's ``BinaryCrossEntropy`` on the
same logits and targets (Mixup's soft targets included) and the class-wise KL stays on the softmax at T:
L = BCE(f(x), y) + lambda * T^2 * KL(...), as timm's distillation task adds a softmax KL to any task loss.
"""

from __future__ import annotations

import torch

from timm_cskd.loss import CSKDLoss
from timm_cskd.methods import register
from timm_cskd.methods.base import Hyper, Method

__all__ = ["CSKD", "CSKDPaired"]

CSKD_HPARAMS = {
    "temperature": Hyper(
        4.0, "T of the class-wise distillation (the paper searched 1 and 4)", low=0, low_open=True
    ),
    "lambda": Hyper(
        1.0, "weight of T^2 * KL (the paper: 1 on CIFAR/ImageNet, 3 on fine-grained sets)", low=0
    ),
}


def mixed_partner_logits(partner_logits: torch.Tensor, lam: float, temperature: float) -> torch.Tensor:
    """Logits whose softmax at T is the partners' distribution mixed like the anchors (lambda, batch flip):
    softmax(T * log(q_mix) / T) == q_mix."""
    q = torch.softmax(partner_logits.float() / temperature, dim=1)
    return temperature * torch.log(lam * q + (1.0 - lam) * q.flip(0))


class _CSKDBase(Method):
    hparams = CSKD_HPARAMS
    # kl: the batch-mean KL(sg p(x'; T) || p(x; T)); loss = ce + lambda * T^2 * kl.
    terms = ("kl",)

    def __init__(self, model, hp, **kwargs):
        super().__init__(model, hp, **kwargs)
        self.criterion = CSKDLoss(
            hp["temperature"], hp["lambda"], self.smoothing, ce_weight=self.fused_ce_weight()
        )


@register
class CSKD(_CSKDBase):
    name = "cskd"
    formula = (
        "CE(f(x), y) + lambda T^2 KL(sg p(x'; T) || p(x; T)), x' a classmate, partners forwarded without grad"
    )
    reference = "Yun et al., CVPR 2020 (arXiv:2003.13964), Algorithm 1"
    batches = "anchor"

    def compute(self, input, target):
        k = input.shape[0] // 2
        anchors, partners, anchor_target = input[:k], input[k:], target[:k]
        anchors, anchor_target, lam = self.mix(anchors, anchor_target)
        output = self.module(anchors)
        with torch.no_grad():
            partner_logits = self.module(partners)
            if lam != 1.0:
                partner_logits = mixed_partner_logits(partner_logits, lam, self.criterion.temperature)
        loss = self.criterion(output, anchor_target, partner_logits)
        loss, ce = self.with_task_term(loss, self.criterion, output, anchor_target)
        return loss, {"ce": ce, "kl": self.criterion.last_terms[1]}, output, anchors


@register
class CSKDPaired(_CSKDBase):
    name = "cskd-paired"
    formula = "over [x; x']: CE on both halves + lambda T^2 KL of each half towards the other's sg prediction"
    reference = "this project: one forward over same-class pairs, the compute of CE"
    batches = "paired"
    mixup = False
    mixup_note = "a mixed pair is no longer one class; use cskd for the paper's Mixup + CS-KD"

    def compute(self, input, target):
        output = self.module(input)
        loss = self.criterion.forward_paired(output, target)
        loss, ce = self.with_task_term(loss, self.criterion, output, target)
        return loss, {"ce": ce, "kl": self.criterion.last_terms[1]}, output, input
