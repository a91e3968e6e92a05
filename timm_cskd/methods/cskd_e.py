"""CS-KD-E: CS-KD on strongly augmented images plus a sample-wise consistency term (Yun et al., CVPR 2020,
Section 3, "CS-KD-E").

Paper: `Regularizing Class-wise Predictions via Self-knowledge Distillation`
    - https://arxiv.org/abs/2003.13964

    L = L_CS-KD(x_aug, x'_aug) + lambda_E * T^2 * KL(P(y | x; sg theta, T) || P(y | x_aug; theta, T))

    L_CS-KD(x_aug, x'_aug) = CE(f(x_aug), y) + lambda * T^2 * KL(P(y | x'_aug; sg theta, T) || P(y | x_aug; theta, T))

Every image is loaded in two views (``views``): ``x_aug``, the standard training transform with a stronger
augmentation on top (``auto_augment``: by default timm's ImageNet RandAugment, ``rand-m9-mstd0.5-inc1``,
with its noisy magnitude capped at 9; this project's default, not a claim about the paper's setting), and
``x``, the standard training transform alone. Batches are the anchor layout of ``cskd`` (anchors, then
same-class partners), so the method receives ``[strong, standard]``, each ``[anchors; partners]``.

Only the anchors' strong view is forwarded with grad. The partners' strong view (the class-wise target)
and the anchors' standard view (the sample-wise target) go through one ``no_grad`` forward in train mode,
as ``cskd`` forwards its partners, so they update BatchNorm statistics too; being one batch of 2k images,
their BatchNorm batch statistics span both halves. The partners' standard view is loaded but unused: the
loader gives every image every view. Per step that is k images with grad and 2k without, about 1.67x the
compute of cross-entropy on k images.

Both distillation terms use the fused CS-KD loss: the second call with ``ce_weight=0`` is exactly
``lambda_E * T^2 * KL`` with its closed-form gradient. Both share CS-KD's temperature, as the formula does.
"""

from __future__ import annotations

import torch
from timm.data import create_transform

from timm_cskd.errors import ConfigError
from timm_cskd.loss import CSKDLoss
from timm_cskd.methods import register
from timm_cskd.methods.base import Hyper, Method
from timm_cskd.methods.cskd import CSKD_HPARAMS

__all__ = ["CSKDE"]


@register
class CSKDE(Method):
    name = "cskd-e"
    formula = (
        "CE(f(x_aug), y) + lambda T^2 KL(sg p(x'_aug; T) || p(x_aug; T)) + lambda_E T^2 KL(sg p(x; T) || "
        "p(x_aug; T)), x_aug a stronger augmentation of x, x' a classmate"
    )
    reference = "Yun et al., CVPR 2020 (arXiv:2003.13964), Section 3, CS-KD-E"
    hparams = {
        **CSKD_HPARAMS,
        "lambda_e": Hyper(
            1.0, "lambda_E, weight of T^2 * KL(sg p(x) || p(x_aug)), the sample-wise term", low=0
        ),
        "auto_augment": Hyper(
            "rand-m9-mstd0.5-inc1-mmax9",
            "the stronger augmentation of x_aug: a timm auto_augment string (RandAugment, AutoAugment, AugMix); "
            "the default is timm's ImageNet RandAugment with magnitudes capped at 9, below the 10 at which "
            "its increasing Posterize keeps 0 bits, which Pillow 13 rejects",
        ),
    }
    # kl, kl_e: the class-wise and the sample-wise batch-mean KL; loss = ce + T^2 (lambda kl + lambda_E kl_e).
    terms = ("kl", "kl_e")
    batches = "anchor"
    mixup = False
    mixup_note = (
        "the sample-wise term compares an image's two views; a mixed strong view has no single standard view "
        "to match"
    )

    @classmethod
    def views(cls, hp: dict) -> list[dict]:
        policy = hp["auto_augment"]
        if not policy:
            raise ConfigError(
                "--method cskd-e needs a stronger augmentation: --method-kwargs auto_augment=..."
            )
        try:
            # timm parses the string only when it builds the transform: fail here, naming the flag.
            create_transform(input_size=32, is_training=True, auto_augment=policy)
        except (AssertionError, KeyError, ValueError) as e:
            raise ConfigError(
                f"--method-kwargs auto_augment={policy!r} is not a timm auto_augment string ({e}); e.g. "
                "rand-m9-mstd0.5-inc1, augmix-m5-w3, original"
            ) from e
        return [{"auto_augment": policy}, {}]

    def __init__(self, model, hp, **kwargs):
        super().__init__(model, hp, **kwargs)
        self.criterion = CSKDLoss(
            hp["temperature"], hp["lambda"], self.smoothing, ce_weight=self.fused_ce_weight()
        )
        # ce_weight 0: the fused loss is lambda_E * T^2 * KL alone (its target and smoothing go unused).
        self.sample_criterion = CSKDLoss(hp["temperature"], hp["lambda_e"], ce_weight=0.0)

    def compute(self, input, target):
        strong, standard = input
        k = strong.shape[0] // 2
        anchors, anchor_target = strong[:k], target[:k]
        output = self.module(anchors)
        with torch.no_grad():
            partner_logits, standard_logits = self.module(torch.cat([strong[k:], standard[:k]])).split(k)
        loss = self.criterion(output, anchor_target, partner_logits)
        loss, ce = self.with_task_term(loss, self.criterion, output, anchor_target)
        kl = self.criterion.last_terms[1]
        loss = loss + self.sample_criterion(output, anchor_target, standard_logits)
        return loss, {"ce": ce, "kl": kl, "kl_e": self.sample_criterion.last_terms[1]}, output, anchors
