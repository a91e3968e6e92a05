"""Cross-entropy and the two output regularisers that only change its target or add an entropy term.

- ``ce``: cross-entropy (``--smoothing`` and Mixup/CutMix as timm applies them).
- ``ls``: label smoothing (Szegedy et al., CVPR 2016): CE against (1 - eps) one-hot + eps / K on every
  class, timm's and torch's convention (some codes spread eps over the K - 1 other classes instead).
- ``maxent``: the confidence penalty (Pereyra et al., ICLR 2017 workshop, arXiv:1701.06548):
  CE - beta * H(p), H = -sum_k p_k log p_k per sample, batch mean.
"""

from __future__ import annotations

import torch

from timm_cskd.methods import register
from timm_cskd.methods.base import Hyper, Method

__all__ = ["CrossEntropy", "LabelSmoothing", "MaxEntropy"]


@register
class CrossEntropy(Method):
    name = "ce"
    formula = "CE(f(x), y)"
    reference = "the baseline of every table"

    def compute(self, input, target):
        input, target, _ = self.mix(input, target)
        output = self.module(input)
        ce = self.ce_weight * self.ce(output, target)
        return ce, {"ce": ce.detach()}, output, input


@register
class LabelSmoothing(CrossEntropy):
    name = "ls"
    formula = "CE(f(x), (1 - eps) onehot(y) + eps / K)"
    reference = "Szegedy et al., CVPR 2016; the paper's Tables 1 and 2"
    hparams = {"smoothing": Hyper(0.1, "eps, spread over all K classes (timm's convention)", low=0, high=1)}
    bce_loss = False
    bce_note = (
        "it is the softmax cross-entropy against smoothed targets; with --bce-loss use --method ce "
        "--smoothing EPS, which timm's BinaryCrossEntropy applies to its targets"
    )

    def __init__(self, model, hp, **kwargs):
        super().__init__(model, hp, **kwargs)
        # Its eps replaces --smoothing (timm's default 0.1 applies to every other method).
        if self.mixup_fn is None:
            self.smoothing = hp["smoothing"]
        else:
            self.mixup_fn.label_smoothing = hp["smoothing"]


@register
class MaxEntropy(Method):
    name = "maxent"
    formula = "CE(f(x), y) - beta H(p(x)), H = -sum_k p_k log p_k"
    terms = ("entropy",)
    reference = "Pereyra et al., 2017 (arXiv:1701.06548); the paper's Tables 1 and 2"
    hparams = {
        "beta": Hyper(
            0.1,
            "entropy weight, to tune per dataset as Pereyra et al. and the CS-KD paper did (Self-KD-Lib's "
            "0.5 * (p log p).mean() over classes is beta = 0.5 / K)",
            low=0,
        )
    }

    def compute(self, input, target):
        input, target, _ = self.mix(input, target)
        output = self.module(input)
        ce = self.ce_weight * self.ce(output, target)
        log_p = torch.log_softmax(output.float(), dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
        return ce - self.hp["beta"] * entropy, {"ce": ce.detach(), "entropy": entropy.detach()}, output, input
