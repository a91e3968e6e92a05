"""The composition root: the one place that builds a run's parts from its configuration (the data
indices and loaders, the model and the method around it, the teacher, the optimizer at the learning rate
resolved once, AMP, EMA, DDP, torch.compile, the scheduler and the scalar log), in the order that makes
every rank start from the same weights and then draw its own random streams. The values known only here
(the experiment's name, the class count, the learning rate) make the run's final configuration, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from timm_cskd import build
from timm_cskd.config import RunConfig
from timm_cskd.data.index import DataIndexError
from timm_cskd.data.loader import (
    build_device_preps,
    build_transforms,
    build_val_prep,
    create_train_loader,
    create_val_loader,
    resolve_pin_memory,
)
from timm_cskd.data.shard_index import ShardIndex
from timm_cskd.distributed import Context
from timm_cskd.errors import ConfigError
from timm_cskd.experiment import ResolvedRun, load_indices, seed_everything, warn_single_image_classes
from timm_cskd.methods import Method
from timm_cskd.scalars import ScalarLog
from timm_cskd.step import autocast_context
from timm_cskd.teacher import load_teacher

__all__ = ["Parts", "assemble", "resolve_lr"]

_logger = logging.getLogger("timm_cskd.train")


@dataclass
class Parts:
    """A run's assembled parts, and its final configuration."""

    config: RunConfig
    train_index: object
    val_index: object
    data_config: dict
    train_loader: object
    val_loader: object
    # The plan sampler itself (the torch loader wraps it to seed each sample's augmentation).
    sampler: object
    mixup_fn: object
    task: Method
    optimizer: torch.optim.Optimizer
    autocast: object
    scaler: torch.amp.GradScaler | None
    updates_per_epoch: int
    scheduler: object
    num_epochs: int
    scalars: ScalarLog | None


def resolve_lr(config: RunConfig, world_size: int, saved_args: dict | None) -> float:
    """--lr; resuming without it, the learning rate the checkpoint's run resolved (the schedule continues
    as it started, also when the rank count, and with it the global batch, changed); else --lr-base scaled."""
    if not config.optim.lr and saved_args is not None and saved_args.get("lr") is not None:
        return saved_args["lr"]
    return build.resolve_lr(config.optim, config.data.batch_size, world_size)


def assemble(
    run: ResolvedRun, ctx: Context, out_dir: Path, experiment: str, saved_args: dict | None
) -> Parts:
    """Build every part of the run in the folder ``out_dir`` of the experiment named ``experiment``;
    ``saved_args`` are the resumed checkpoint's (None when starting)."""
    config, method_cls = run.config, run.method_cls
    model_cfg, data, method, runtime = config.model, config.data, config.method, config.runtime
    # The same initial weights on every rank (so is each rank's EMA copy); per-rank streams after.
    seed_everything(runtime.seed)
    train_index, val_index = load_indices(
        data, ctx, out_dir, num_classes=model_cfg.num_classes, batches=method_cls.batches
    )
    if ctx.primary and not isinstance(train_index, ShardIndex):  # shards: named per rank
        warn_single_image_classes(train_index, method_cls)
    num_classes = train_index.num_classes
    # The run's final configuration: what only the folder, the index and the rank count tell.
    config = config.replace(
        experiment=experiment,
        num_classes=num_classes,
        lr=resolve_lr(config, ctx.world_size, saved_args),
    )
    build.import_device_modules(runtime)
    model = method_cls.adapt_model(build.create_model(config.model, num_classes), method.method_kwargs)
    data_config = build.resolve_data_config(config.model, model)
    error, loaders = None, (None, None, None)
    try:
        loaders = _create_loaders(config, ctx, method_cls, train_index, val_index, data_config, run.views)
    except ValueError as e:  # e.g. a sampler refusing these settings: every rank fails, none waits below
        error = (
            e if isinstance(e, (ConfigError, DataIndexError)) else ConfigError(f"the training sampler: {e}")
        )
    ctx.fail_together(error)
    train_loader, val_loader, sampler = loaders
    if hasattr(sampler, "set_epoch_units"):
        # Rank-pinned shards: every rank takes as many steps as the largest share needs; the agreed
        # length is the same on every rank, so a world with less than one batch fails on all of them.
        try:
            sampler.set_rank_units(ctx.gather(sampler.local_units))
        except ValueError as e:
            raise ConfigError(f"the training sampler: {e}") from e

    mixup_fn = build.create_mixup(data, method.smoothing, num_classes)
    teacher, kd = None, run.kd
    if kd is not None:
        teacher, source = load_teacher(method.kd_model_name, num_classes, method.kd_model_arch)
        _logger.info(
            "knowledge distillation from %s (T %g, task weight %g, distill weight %g)",
            source,
            kd.temperature,
            kd.task_weight,
            kd.distill_weight,
        )
    task = build.create_task(method, method_cls, model, data_config, mixup_fn, teacher, kd, ctx.device)
    if runtime.sync_bn and ctx.distributed:
        task.trainable_module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task.trainable_module)
    task.to(ctx.device)
    if data.channels_last:
        task.to(memory_format=torch.channels_last)

    optim = config.optim
    # The trainable module: the model and whatever the method trains besides it, never a teacher.
    optimizer = build.create_optimizer(optim, task.get_trainable_module())
    scaler = torch.amp.GradScaler(ctx.device.type) if runtime.amp and runtime.amp_dtype == "float16" else None
    if optim.model_ema:
        task.setup_ema(decay=optim.model_ema_decay, use_warmup=optim.model_ema_warmup)
    if ctx.distributed:
        # Only when asked: torch deprecates the argument, and True is its default.
        ddp_kwargs = {"broadcast_buffers": False} if runtime.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[ctx.device] if ctx.device.type == "cuda" else None, **ddp_kwargs)
    if runtime.torchcompile:
        task.compile(backend=runtime.torchcompile, mode=runtime.torchcompile_mode)
    seed_everything(runtime.seed + ctx.rank)

    # An update every --grad-accum-steps batches, the last one taking whatever the epoch has left.
    updates_per_epoch = -(-len(train_loader) // optim.grad_accum_steps)
    scheduler, num_epochs = build.create_scheduler(
        optim, optimizer, updates_per_epoch, seed=runtime.seed, eval_metric=config.output.eval_metric
    )
    return Parts(
        config=config,
        train_index=train_index,
        val_index=val_index,
        data_config=data_config,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        mixup_fn=mixup_fn,
        task=task,
        optimizer=optimizer,
        autocast=autocast_context(runtime, ctx.device),
        scaler=scaler,
        updates_per_epoch=updates_per_epoch,
        scheduler=scheduler,
        num_epochs=num_epochs,
        scalars=_open_scalars(config, ctx, out_dir),
    )


def _create_loaders(
    config: RunConfig, ctx: Context, method_cls, train_index, val_index, data_config: dict, views: list
):
    """The training and validation loaders of --data-backend (no validation loader without a split), and
    the training plan sampler."""
    data = config.data
    train_tf, val_tf = build_transforms(data, data_config, views)
    if data.data_backend == "dali":
        from timm_cskd.data.dali import create_dali_loaders

        runtime = config.runtime
        train, val = create_dali_loaders(
            data,
            train_index,
            val_index,
            data_config,
            ctx,
            method_cls.batches,
            len(views),
            seed=runtime.seed,
            float16=runtime.amp and runtime.amp_dtype == "float16",
        )
        return train, val, train.batch_sampler  # DALI's loader reads the plan itself
    # uint8 from the workers, normalised and erased on the device (DALI's come out normalised).
    pin_memory = resolve_pin_memory(data, ctx.device)
    train_loader = create_train_loader(
        train_index,
        train_tf,
        data,
        batches=method_cls.batches,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        seed=config.runtime.seed,
        preps=build_device_preps(data, data_config, views, ctx.device),
        pin_memory=pin_memory,
    )
    val_loader = None
    if val_index is not None:
        val_loader = create_val_loader(
            val_index,
            val_tf,
            data.validation_batch_size or data.batch_size,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            workers=data.workers,
            prep=build_val_prep(data_config, ctx.device, data.channels_last),
            pin_memory=pin_memory,
        )
    return train_loader, val_loader, train_loader.plan


def _open_scalars(config: RunConfig, ctx: Context, out_dir: Path) -> ScalarLog | None:
    """Rank 0's W&B/TensorBoard log; every rank fails together if it cannot start."""
    scalars, error = None, None
    if ctx.primary:
        try:
            scalars = ScalarLog(config.output, out_dir, config.to_dict())
        except Exception as e:  # a missing extra or wandb refusing to start: no rank may wait on rank 0
            error = e if isinstance(e, ConfigError) else ConfigError(f"--log-wandb/--log-tensorboard: {e}")
    ctx.fail_together(error)
    return scalars
