"""One evaluation pass: a model over this rank's shard in full float32, the metric sums all-reduced and,
when asked, the pooled features, logits and labels gathered on rank 0 in dataset order.

``timm_cskd.evaluate`` and the trainer's validation both run it; ``recall_at_1`` scores its features.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from timm_cskd.metrics import DEFAULT_ECE_BINS, ClassificationMeter, recall_at_k
from timm_cskd.precision import full_fp32

__all__ = ["Evaluation", "evaluate", "recall_at_1"]

# Only the evaluate command asks for progress lines: they go out under its logger.
_logger = logging.getLogger("timm_cskd.evaluate")


@dataclass
class Evaluation:
    meter: ClassificationMeter
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def _forward(model, images, collect: bool):
    if not collect:
        return model(images), None
    features = model.forward_features(images)
    return model.forward_head(features), model.forward_head(features, pre_logits=True)


def _gather_to_primary(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor | None:
    """On rank 0, the ranks' shards in dataset order (rank r held images r, r + W, r + 2W, ...); None on
    the other ranks, which never use them (an all-gather would hold W copies of the features)."""
    if world_size == 1:
        return local
    longest = -(-total // world_size)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: len(local)] = local
    primary = dist.get_rank() == 0
    parts = [torch.empty_like(padded) for _ in range(world_size)] if primary else None
    dist.gather(padded, parts, dst=0)
    if not primary:
        return None
    out = local.new_empty((total, *local.shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::world_size] = part[: len(range(rank, total, world_size))]
    return out


def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    *,
    autocast=contextlib.nullcontext,
    channels_last: bool = False,
    num_bins: int = DEFAULT_ECE_BINS,
    collect: bool = False,
    save_logits: bool = False,
    progress: bool = False,
) -> Evaluation:
    """Run ``model`` over ``loader`` (this rank's shard) in full float32 and all-reduce the metric sums.

    ``collect`` also gathers penultimate pooled features (for recall@k), ``save_logits`` the float32
    logits; either gathers the labels, all in dataset order on rank 0 (None on the other ranks).
    ``progress`` logs every tenth of the batches.
    """
    meter = ClassificationMeter(num_bins=num_bins, device=device)
    features, logits_seen, labels = [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad(), full_fp32():
        report_every = max(len(loader) // 10, 1)
        for step, (images, target) in enumerate(loader, 1):
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits, pooled = _forward(model, images, collect)
            meter.update(logits, target)
            if collect:
                features.append(pooled.float())
            if save_logits:
                logits_seen.append(logits.float())
            if collect or save_logits:
                labels.append(target)
            if progress and (step % report_every == 0 or step == len(loader)):
                _logger.info("evaluated %d/%d batches", step, len(loader))
    model.train(was_training)
    meter.all_reduce()
    result = Evaluation(meter)
    if collect or save_logits:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        total = int(meter.sums[0].item())
        result.labels = _gather_to_primary(torch.cat(labels), total, world)
        if collect:
            result.features = _gather_to_primary(torch.cat(features), total, world)
        if save_logits:
            result.logits = _gather_to_primary(torch.cat(logits_seen), total, world)
    return result


def recall_at_1(result: Evaluation, chunk_size: int = 1024) -> float:
    """recall@1 (percent) of an evaluation's gathered features, on rank 0, in full float32 like every
    other metric: its shortlist's matrix products would otherwise run in the TF32 training turns on."""
    with full_fp32():
        return recall_at_k(result.features, result.labels, k=1, chunk_size=chunk_size)
