"""One training step as the trainer runs it: the method's forward under autocast, the backward (scaled by
torch's GradScaler for float16), gradient clipping and the optimizer update, with gradient accumulation as
timm's ``train.py`` does it (each batch's loss divided by the number accumulated, DDP's all-reduce only on
the batch that completes the update). ``timm_cskd.train`` and ``timm_cskd.benchmark`` both step with it,
so the benchmark times the step that trains.
"""

from __future__ import annotations

import contextlib

import torch
from timm.utils import dispatch_clip_grad

from timm_cskd.config import RuntimeConfig

__all__ = ["autocast_context", "train_step"]


def autocast_context(args: RuntimeConfig, device: torch.device):
    """A factory of the autocast context --amp / --amp-dtype ask for (a null context without --amp)."""
    if not args.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    task,
    optimizer: torch.optim.Optimizer,
    images,
    target: torch.Tensor,
    *,
    autocast,
    scaler: torch.amp.GradScaler | None = None,
    accum: int = 1,
    update: bool = True,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    synchronize: bool = False,
) -> dict[str, torch.Tensor]:
    """Forward and backward one batch through ``task`` (a ``timm_cskd.methods.Method``); step the
    optimizer when ``update`` (the last of ``accum`` accumulated batches). Returns the task's result
    (``loss``, ``ce``, ``reg``, ``terms``, ``output``); ``synchronize`` waits for the device after an update
    (timm's --synchronize-step)."""
    with contextlib.nullcontext() if update else task.no_sync():
        with autocast():
            result = task(images, target)
        loss = result["loss"]
        scaled = loss / accum if accum > 1 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    if update:
        if scaler is not None and clip_grad:
            scaler.unscale_(optimizer)
        if clip_grad:
            parameters = task.get_clip_parameters(exclude_head="agc" in clip_mode)
            dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if synchronize and loss.device.type == "cuda":
            torch.cuda.synchronize()
    return result
