"""Class-wise Self-Knowledge Distillation loss.

Paper: `Regularizing Class-wise Predictions via Self-knowledge Distillation`
    - https://arxiv.org/abs/2003.13964 (Yun et al., CVPR 2020)

    L = CE(f(x), y) + lambda_cls * T^2 * KL(softmax(f(x') / T) || softmax(f(x) / T))

with x' another sample of the same class, its prediction detached, KL summed over classes and averaged
over the batch. The reference code (alinlab/cs-kd) composes log_softmax + kl_div + cross_entropy; here one
autograd function computes both terms and their closed-form gradient in a single float32 pass:

    dL/dz = (softmax(z) - y) / B + lambda_cls * T * (softmax(z / T) - softmax(z' / T)) / B

so the only tensor kept for backward is that gradient, in the logits' dtype (float32 for float16 logits,
whose range would flush small entries to zero before the AMP loss scale is applied).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CSKDLoss", "cskd_loss", "unfused_cskd_loss"]


def _check_settings(temperature, lambda_cls, label_smoothing):
    """The loss's settings, checked where they are given: ``CSKDLoss()`` and every ``cskd_loss`` call."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if lambda_cls < 0:
        raise ValueError(f"lambda_cls must be >= 0, got {lambda_cls}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _check_tensors(logits, target, partner_logits):
    if logits.ndim != 2:
        raise ValueError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if partner_logits is not None and partner_logits.shape != logits.shape:
        raise ValueError(
            f"partner_logits shape {tuple(partner_logits.shape)} != logits shape {tuple(logits.shape)}"
        )
    batch, num_classes = logits.shape
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"soft target shape {tuple(target.shape)} != logits shape {tuple(logits.shape)}")
        return
    if target.shape != (batch,):
        raise ValueError(f"target must be ({batch},) class indices, got shape {tuple(target.shape)}")
    in_range = ((target >= 0) & (target < num_classes)).all()
    if target.device.type == "cpu":
        if not in_range:
            bad = target[(target < 0) | (target >= num_classes)][0].item()
            raise ValueError(f"target {bad} out of range for {num_classes} classes")
    else:
        # No host sync on the hot path: the check fails asynchronously on the device.
        torch._assert_async(in_range, f"target out of range for {num_classes} classes")


class _FusedCSKD(torch.autograd.Function):
    """CE + T^2-scaled KL in one float32 (or float64) pass; saves only dL/dlogits."""

    @staticmethod
    def forward(
        ctx, logits, target, partner_logits, temperature, lambda_cls, label_smoothing, swap_halves, ce_weight
    ):
        # Autocast would run the dot products below in bf16/fp16: the logged and scaled loss lose digits.
        with torch.autocast(logits.device.type, enabled=False):
            return _FusedCSKD._forward(
                ctx,
                logits,
                target,
                partner_logits,
                temperature,
                lambda_cls,
                label_smoothing,
                swap_halves,
                ce_weight,
            )

    @staticmethod
    def _forward(
        ctx, logits, target, partner_logits, temperature, lambda_cls, label_smoothing, swap_halves, ce_weight
    ):
        batch, num_classes = logits.shape
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        z = logits.to(compute_dtype)

        # Cross-entropy term; `grad` ends up as softmax(z) - y, reusing the log-softmax buffer.
        grad = torch.log_softmax(z, dim=1)
        if target.is_floating_point():
            soft = target.to(compute_dtype)
            ce = -(soft.flatten() @ grad.flatten())
        else:
            soft = None
            ce = -grad.gather(1, target[:, None]).sum()
        if label_smoothing > 0:
            ce = (1.0 - label_smoothing) * ce - label_smoothing / num_classes * grad.sum()
        grad.exp_()
        if soft is not None:
            grad.sub_(soft)
        else:
            grad.scatter_add_(1, target[:, None], grad.new_full((batch, 1), -1.0 + label_smoothing))
        if label_smoothing > 0:
            if soft is not None:
                grad.add_(soft, alpha=label_smoothing).sub_(label_smoothing / num_classes)
            else:
                grad.sub_(label_smoothing / num_classes)
        if ce_weight != 1.0:
            grad.mul_(ce_weight)

        # KL(q || p_T) with q the detached partner distribution at temperature T.
        log_p = torch.log_softmax(z / temperature, dim=1)
        del z
        if swap_halves:
            log_q = log_p.roll(batch // 2, dims=0)
        else:
            log_q = torch.log_softmax(partner_logits.detach().to(compute_dtype) / temperature, dim=1)
        q = log_q.exp()
        # A zero-probability class contributes 0 (as kl_div's xlogy does), not 0 * -inf.
        log_q.clamp_(min=torch.finfo(compute_dtype).min)
        kl = q.flatten() @ log_q.sub_(log_p).flatten()
        del log_q

        ce_mean, kl_mean = ce / batch, kl / batch
        loss = ce_weight * ce_mean + lambda_cls * temperature * temperature * kl_mean
        grad.add_(log_p.exp_().sub_(q), alpha=lambda_cls * temperature).div_(batch)

        # float16 would flush small gradient entries to zero before GradScaler's scale lifts them: keep
        # float32 there (bfloat16 has float32's range and is kept in its own dtype).
        ctx.save_for_backward(grad if logits.dtype == torch.float16 else grad.to(logits.dtype))
        ctx.mark_non_differentiable(ce_mean, kl_mean)
        return loss, ce_mean, kl_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        # In float32: GradScaler's grad_loss (65536 and up) is inf in float16, which would skip every step.
        scaled = grad.to(grad_loss.dtype) * grad_loss
        return scaled.to(grad.dtype), None, None, None, None, None, None, None


def cskd_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    partner_logits: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    lambda_cls: float = 1.0,
    label_smoothing: float = 0.0,
    symmetric: bool = False,
    ce_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused CS-KD loss; returns ``(total, ce, kl)`` with ``ce`` and ``kl`` detached batch means.

    ``kl`` is the unscaled batch-mean KL: ``total = ce_weight * ce + lambda_cls * T^2 * kl`` (``ce_weight``
    0 leaves the distillation term alone, as a second KL target needs).

    ``target`` holds class indices ``(B,)`` or soft targets ``(B, C)`` (Mixup). With ``symmetric=True``
    (the paired mode) ``partner_logits`` must be None and ``logits`` holds ``[x; x']``: both halves get CE
    and each half is distilled towards the other half's detached prediction, averaged over all 2k images.
    """
    if symmetric:
        if partner_logits is not None:
            raise ValueError(
                "symmetric=True takes the partners from the second half; pass partner_logits=None"
            )
        if logits.ndim != 2 or logits.shape[0] % 2:
            raise ValueError(
                f"symmetric CS-KD needs an even batch of [x; x'], got shape {tuple(logits.shape)}"
            )
    elif partner_logits is None:
        raise ValueError("partner_logits is required unless symmetric=True")
    _check_settings(temperature, lambda_cls, label_smoothing)
    _check_tensors(logits, target, partner_logits)
    return _FusedCSKD.apply(
        logits,
        target,
        partner_logits,
        float(temperature),
        float(lambda_cls),
        float(label_smoothing),
        symmetric,
        float(ce_weight),
    )


def unfused_cskd_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    partner_logits: torch.Tensor,
    temperature: float = 4.0,
    lambda_cls: float = 1.0,
) -> torch.Tensor:
    """The reference code's composition (log_softmax + kl_div + cross_entropy) that ``cskd_loss``
    replaces, in float32: the baseline the benchmarks time and measure the fused loss against."""
    z, v = logits.float(), partner_logits.float().detach()
    kl = F.kl_div(F.log_softmax(z / temperature, 1), F.softmax(v / temperature, 1), reduction="batchmean")
    return F.cross_entropy(z, target) + lambda_cls * temperature**2 * kl


class CSKDLoss(nn.Module):
    """CE plus the class-wise self-distillation term of CS-KD (Yun et al., CVPR 2020).

    ``forward(logits, target, partner_logits)`` returns the scalar total loss; ``partner_logits`` never
    receives a gradient. ``forward_paired(logits, target)`` is the symmetric form for a batch ``[x; x']``.
    ``last_terms`` holds the detached ``(ce, kl)`` of the latest call for logging without recomputation.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        lambda_cls: float = 1.0,
        label_smoothing: float = 0.0,
        ce_weight: float = 1.0,
    ):
        super().__init__()
        _check_settings(temperature, lambda_cls, label_smoothing)
        self.temperature = temperature
        self.lambda_cls = lambda_cls
        self.label_smoothing = label_smoothing
        self.ce_weight = ce_weight
        self.last_terms: tuple[torch.Tensor, torch.Tensor] | None = None

    def _run(self, logits, target, partner_logits, symmetric):
        total, ce, kl = cskd_loss(
            logits,
            target,
            partner_logits,
            temperature=self.temperature,
            lambda_cls=self.lambda_cls,
            label_smoothing=self.label_smoothing,
            symmetric=symmetric,
            ce_weight=self.ce_weight,
        )
        self.last_terms = (ce, kl)
        return total

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, partner_logits: torch.Tensor
    ) -> torch.Tensor:
        return self._run(logits, target, partner_logits, symmetric=False)

    def forward_paired(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._run(logits, target, None, symmetric=True)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, lambda_cls={self.lambda_cls}, label_smoothing={self.label_smoothing}"
