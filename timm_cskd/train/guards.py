"""The run's guards: a stop request (SIGTERM, a scheduler's preemption notice) and a non-finite loss or
weights, agreed across ranks so that all stop at the same step, or one would wait forever in the next
all-reduce. The first non-finite step is remembered on the device: no host sync until an agreement.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from timm_cskd.distributed import Context
from timm_cskd.stop_flag import StopFlag

__all__ = [
    "DIVERGED_HINT",
    "NO_STEP",
    "TrainingDivergedError",
    "agree",
    "check_finite_weights",
]

# The earliest non-finite step, encoded so that a MAX all-reduce finds it: NO_STEP - step, 0 when none.
NO_STEP = 2**50

DIVERGED_HINT = "lower --lr, add --clip-grad or --warmup-epochs, or try --amp-dtype bfloat16"


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN/inf; the last good checkpoint is kept."""


def mark_non_finite(first_bad_step: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """``first_bad_step`` updated on the device: ``step`` (encoded) if ``loss`` is the first non-finite."""
    return torch.where(torch.isfinite(loss) | (first_bad_step > 0), first_bad_step, NO_STEP - step - 1)


def agree(
    ctx: Context, stop: StopFlag, first_bad_step: torch.Tensor, *, check_finite: bool, epoch: int, last: Path
) -> bool:
    """Whether any rank was asked to stop; raises on every rank if any rank saw a non-finite loss
    (``epoch`` and the checkpoint ``last`` name where the run stands in the message)."""
    if not ctx.distributed and not check_finite:
        return stop.requested
    flags = torch.stack([torch.tensor(float(stop.requested), device=ctx.device), first_bad_step.double()])
    if ctx.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    requested, bad = flags.tolist()
    if bad:
        step = NO_STEP - int(bad)
        raise TrainingDivergedError(
            f"the loss became NaN/inf at step {step} (epoch {epoch + 1}); stopped before saving, "
            f"so {last} keeps the last good state; {DIVERGED_HINT}"
        )
    return bool(requested)


def check_finite_weights(task, ctx: Context, *, step: int, epoch: int, last: Path) -> None:
    """Raise on every rank if any rank's trainable weights (or EMA weights) hold a NaN/inf."""
    tensors = [t for t in task.get_trainable_module().state_dict().values() if t.is_floating_point()]
    if task.has_ema():
        ema = task.get_trainable_module(ema=True).state_dict().values()
        tensors += [t for t in ema if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()
    if ctx.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise TrainingDivergedError(
            f"the weights are NaN/inf at step {step} (epoch {epoch + 1}): "
            f"not saving, {last} keeps the last good state; {DIVERGED_HINT}"
        )
