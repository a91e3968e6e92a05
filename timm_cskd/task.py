"""CS-KD as a ``timm.task.TrainingTask``: it composes with timm's EMA, DDP preparation and compile hooks.

Batches arrive as ``[x; x']``: the first half, then same-class partners in the same order (the
ClassPairSampler layout).

- ``anchor``: the paper's code. Forward the anchors with grad, the partners under ``no_grad`` in train
  mode (so partner batches update BatchNorm statistics, as in alinlab/cs-kd), CE on anchors only.
- ``paired``: one forward over the whole batch, CE on both halves, each half distilled towards the
  other's detached prediction. Same compute as cross-entropy.
- ``off``: cross-entropy on the first half (or on the whole batch of a plain sampler), a clean baseline.

With Mixup/CutMix (``mixup_fn``, timm's ``Mixup`` in batch mode) the anchors are mixed and the KL target
is the partners' predictions mixed with the same lambda and permutation (the paper's Table 3).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.task import ClassificationTask

from timm_cskd.loss import CSKDLoss

__all__ = ["CSKDTask", "MODES"]

MODES = ("anchor", "paired", "off")


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    if target.is_floating_point():
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


class CSKDTask(ClassificationTask):
    """Forward + CS-KD loss; returns ``loss``, ``output`` (first-half logits), ``ce`` and ``cls`` terms.

    ``cls`` is the regularizer's contribution ``lambda * T^2 * KL`` so that ``loss = ce + cls``.
    ``pair_batches=False`` (only with ``mode="off"``) takes whole batches from an ordinary sampler.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "anchor",
        temperature: float = 4.0,
        lambda_cls: float = 1.0,
        smoothing: float = 0.0,
        mixup_fn: Mixup | None = None,
        pair_batches: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not pair_batches and mode != "off":
            raise ValueError("CS-KD needs class-pair batches; only mode='off' takes plain batches")
        if mixup_fn is not None:
            if mode == "paired":
                raise ValueError("Mixup/CutMix is supported with the anchor and off modes, not paired")
            if mixup_fn.mode != "batch":
                raise ValueError(
                    "CS-KD mixes partner predictions with the batch's lambda: use Mixup mode='batch'"
                )
        # Mixup applies the smoothing inside its soft targets; the loss must not smooth them again.
        loss_smoothing = 0.0 if mixup_fn is not None else smoothing
        super().__init__(
            model,
            criterion=CSKDLoss(temperature, lambda_cls, loss_smoothing),
            device=device,
            dtype=dtype,
            verbose=verbose,
        )
        self.mode = mode
        self.smoothing = smoothing
        self.loss_smoothing = loss_smoothing
        self.mixup_fn = mixup_fn
        self.pair_batches = pair_batches

    def _mix(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """timm's batch Mixup/CutMix on ``x`` in place, returning soft targets and the (area-corrected) lambda."""
        if len(x) % 2:
            raise ValueError("Mixup needs an even number of anchors per batch")
        lam = self.mixup_fn._mix_batch(x)
        soft = mixup_target(target, self.mixup_fn.num_classes, lam, self.mixup_fn.label_smoothing)
        return x, soft, lam

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.trainable_module
        if self.mode == "paired":
            output = model(input)
            loss = self.criterion.forward_paired(output, target)
            ce, kl = self.criterion.last_terms
            return {"loss": loss, "output": output, "ce": ce, "cls": loss.detach() - ce}

        if self.pair_batches:
            k = input.shape[0] // 2
            first, partner, first_target = input[:k], input[k:], target[:k]
        else:
            first, partner, first_target = input, None, target
        lam = 1.0
        if self.mixup_fn is not None:
            first, first_target, lam = self._mix(first.clone(), first_target)
        output = model(first)

        if self.mode == "off":
            loss = _soft_cross_entropy(output, first_target, self.loss_smoothing)
            return {
                "loss": loss,
                "output": output,
                "ce": loss.detach(),
                "cls": torch.zeros_like(loss.detach()),
            }

        with torch.no_grad():
            partner_logits = model(partner)
            if lam != 1.0:
                # softmax(T * log(q_mix) / T) == q_mix: pass the mixed partner distribution as logits.
                t = self.criterion.temperature
                q = torch.softmax(partner_logits.float() / t, dim=1)
                partner_logits = t * torch.log(lam * q + (1.0 - lam) * q.flip(0))
        loss = self.criterion(output, first_target, partner_logits)
        ce, _ = self.criterion.last_terms
        return {"loss": loss, "output": output, "ce": ce, "cls": loss.detach() - ce}
