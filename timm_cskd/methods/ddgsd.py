"""DDGSD, Data-Distortion Guided Self-Distillation (Xu and Liu, AAAI 2019).

Paper: `Data-Distortion Guided Self-Distillation for Deep Neural Networks` (AAAI 2019)

Two independently augmented views a, b of every image go through the network in one forward over
``[a; b]``; each view learns the labels, each view's prediction is distilled towards the other's, and a
linear-kernel maximum mean discrepancy pulls the two views' mean pooled features together:

    L = CE(a) + CE(b) + lambda * T^2 * [KL(sg p_b || p_a) + KL(sg p_a || p_b)]
        + mu * || mean_i f_a,i - mean_i f_b,i ||^2

with B images per step: each CE and KL a mean over the B images (KL summed over classes), p_a, p_b the
softmax at temperature T, sg a stop-gradient, f the pooled penultimate features (``pre_logits``) averaged
over the B images of this rank's batch, the squared L2 norm summed over feature channels. The logged
``ce`` is CE(a) + CE(b) (``--smoothing`` applies to both; ``--bce-loss`` makes both timm's BCE).

The CE + KL part is the fused CS-KD loss in its symmetric form over ``[a; b]`` (each half distilled
towards the other's detached prediction) times 2, since that form averages over all 2B images.
Defaults lambda 1, T 4 and mu 5e-4 are Self-KD-Lib's choices for DDGSD.
"""

from __future__ import annotations

import torch

from timm_cskd.loss import CSKDLoss
from timm_cskd.methods import register
from timm_cskd.methods.base import Hyper, Method, WithFeatures

__all__ = ["DDGSD"]


@register
class DDGSD(Method):
    name = "ddgsd"
    formula = (
        "CE(a) + CE(b) + lambda T^2 [KL(sg p_b || p_a) + KL(sg p_a || p_b)] + mu ||mean f_a - mean f_b||^2, "
        "a, b two augmentations of each image"
    )
    reference = "Xu and Liu, AAAI 2019; a self-distillation baseline of the CS-KD paper"
    hparams = {
        "lambda": Hyper(1.0, "weight of the two T^2 * KL terms between the views (Self-KD-Lib's 1)", low=0),
        "temperature": Hyper(
            4.0, "T of the distillation between the views (Self-KD-Lib's 4)", low=0, low_open=True
        ),
        "mu": Hyper(
            5e-4, "weight of the squared distance of the views' mean features (Self-KD-Lib's 5e-4)", low=0
        ),
    }
    # kl: KL(sg p_b || p_a) + KL(sg p_a || p_b); mmd: ||mean f_a - mean f_b||^2.
    terms = ("kl", "mmd")
    mixup = False
    mixup_note = (
        "DDGSD distils between two augmentations of one image; batch Mixup would mix each view with "
        "another image and the views would no longer show the same thing"
    )

    @classmethod
    def views(cls, hp: dict) -> list[dict]:
        # Two independent draws of the standard training transform.
        return [{}, {}]

    def __init__(self, model, hp, **kwargs):
        super().__init__(model, hp, **kwargs)
        self.criterion = CSKDLoss(
            hp["temperature"], hp["lambda"], self.smoothing, ce_weight=self.fused_ce_weight()
        )

    def build_trainable(self, model):
        return WithFeatures(model)

    def compute(self, input, target):
        if not isinstance(input, list | tuple) or len(input) != 2:
            raise ValueError("ddgsd trains on two augmented views per image: a list [view_a, view_b]")
        images = torch.cat(list(input))
        # One forward (one DDP synchronisation, BatchNorm statistics over both views) for logits and features.
        logits, features = self.module(images)
        targets = torch.cat([target, target])
        loss = 2.0 * self.criterion.forward_paired(logits, targets)
        loss, ce = self.with_task_term(loss, self.criterion, logits, targets, scale=2.0)
        f_a, f_b = features.float().chunk(2)
        mmd = (f_a.mean(0) - f_b.mean(0)).pow(2).sum()
        # The symmetric fused KL is a mean over 2B images: twice it is the sum of the two directions' means.
        terms = {"ce": ce, "kl": 2.0 * self.criterion.last_terms[1], "mmd": mmd.detach()}
        return loss + self.hp["mu"] * mmd, terms, logits, images
