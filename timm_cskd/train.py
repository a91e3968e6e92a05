"""The training job behind ``train_imagenet.py``: DDP from torchrun's environment, torch AMP, CS-KD as a
timm TrainingTask, timm's optimizer/scheduler/EMA, exact mid-epoch resume and SIGTERM checkpoints.

``run(args)`` trains and returns the final validation metrics; ``main(argv)`` is the command line and
``cli(argv)`` the command users run (``timm-cskd train``, ``python -m timm_cskd.train``), the demo by default.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from timm.utils import distribute_bn, update_summary
from timm.utils.model import unwrap_model

from timm_cskd import build
from timm_cskd import checkpoint as ckpt
from timm_cskd.atomic import write_atomic
from timm_cskd.config import DEMO_CONFIG, dump_args, parse_args
from timm_cskd.data.index import DataIndexError
from timm_cskd.data.loader import (
    SeededBatches,
    build_device_preps,
    build_transforms,
    build_val_prep,
    create_train_loader,
    create_val_loader,
    resolve_pin_memory,
)
from timm_cskd.data.shard_index import ShardIndex
from timm_cskd.distributed import Context, setup_context
from timm_cskd.errors import ConfigError
from timm_cskd.evaluate import evaluate
from timm_cskd.experiment import (
    load_indices,
    open_experiment,
    remove_previous_run,
    seed_everything,
    setup_logging,
    validate_args,
    warn_single_image_classes,
)
from timm_cskd.methods import describe_methods, kd_config
from timm_cskd.naming import format_duration
from timm_cskd.run_lock import RunLockedError
from timm_cskd.scalars import ScalarLog
from timm_cskd.step import autocast_context, train_step
from timm_cskd.stop_flag import StopFlag
from timm_cskd.teacher import load_teacher

__all__ = ["Trainer", "TrainingDivergedError", "run", "main"]

_logger = logging.getLogger("timm_cskd.train")

# The earliest non-finite step, encoded so that a MAX all-reduce finds it: NO_STEP - step, 0 when none.
NO_STEP = 2**50


DIVERGED_HINT = "lower --lr, add --clip-grad or --warmup-epochs, or try --amp-dtype bfloat16"


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    # --checkpoint-hist: the kept epoch checkpoints as (eval metric, epoch), best first.
    kept: list[list] = field(default_factory=list)
    # This epoch's loss terms (loss, ce, reg) summed over all ranks' batches so far, and how many
    # rank-batches that is: a resumed epoch, on any number of ranks, reports its means whole.
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_count: int = 0


class Trainer:
    def __init__(self, args):
        self.method_cls = validate_args(args)
        self.args = args
        self.ctx = ctx = setup_context(args)
        self.out_dir, self.lock = open_experiment(args, ctx)
        try:
            self._build(args, ctx)
        except BaseException:
            self.close()
            raise

    def _build(self, args, ctx: Context) -> None:
        setup_logging(ctx, self.out_dir / "log.txt")
        resume = self._load_resume_checkpoint(args.resume) if args.resume else None
        if resume is not None and not args.lr and resume[1].get("args", {}).get("lr") is not None:
            # The schedule continues as it started, also when the rank count (global batch) changed.
            args.lr = resume[1]["args"]["lr"]
        # The same initial weights on every rank (so is each rank's EMA copy); per-rank streams after.
        seed_everything(args.seed)

        self.train_index, self.val_index = load_indices(args, ctx, self.out_dir)
        if ctx.primary and not isinstance(self.train_index, ShardIndex):  # shards: named per rank
            warn_single_image_classes(self.train_index, self.method_cls)
        num_classes = self.train_index.num_classes
        if args.num_classes is None:
            args.num_classes = num_classes
        build.import_device_modules(args)
        model = self.method_cls.adapt_model(build.create_model(args, num_classes), args.method_kwargs)
        self.data_config = build.resolve_data_config(args, model)
        views = self.method_cls.views(args.method_kwargs)
        train_tf, val_tf = build_transforms(args, self.data_config, views)
        batches = self.method_cls.batches
        if args.data_backend == "dali":
            from timm_cskd.data.dali import create_dali_loaders

            self.train_loader, self.val_loader = create_dali_loaders(
                args, self.train_index, self.val_index, self.data_config, ctx, batches, len(views)
            )
        else:
            # uint8 from the workers, normalised and erased on the device (DALI's come out normalised).
            pin_memory = resolve_pin_memory(args, ctx.device)
            self.train_loader = create_train_loader(
                self.train_index,
                train_tf,
                args,
                batches=batches,
                num_replicas=ctx.world_size,
                rank=ctx.rank,
                preps=build_device_preps(args, self.data_config, views, ctx.device),
                pin_memory=pin_memory,
            )
            self.val_loader = None
            if self.val_index is not None:
                self.val_loader = create_val_loader(
                    self.val_index,
                    val_tf,
                    args.validation_batch_size or args.batch_size,
                    num_replicas=ctx.world_size,
                    rank=ctx.rank,
                    workers=args.workers,
                    prep=build_val_prep(self.data_config, ctx.device, args.channels_last),
                    pin_memory=pin_memory,
                )
        # The plan sampler itself (the torch loader wraps it to seed each sample's augmentation).
        batch_sampler = self.train_loader.batch_sampler
        self.sampler = (
            batch_sampler.batch_sampler if isinstance(batch_sampler, SeededBatches) else batch_sampler
        )
        if hasattr(self.sampler, "set_epoch_units"):
            # Rank-pinned shards: every rank takes as many steps as the largest share needs.
            self.sampler.set_epoch_units(max(ctx.gather(self.sampler.local_units)))

        self.mixup_fn = build.create_mixup(args, num_classes)
        teacher, kd = None, kd_config(args)
        if kd is not None:
            teacher, source = load_teacher(args.kd_model_name, num_classes, args.kd_model_arch)
            _logger.info(
                "knowledge distillation from %s (T %g, task weight %g, distill weight %g)",
                source,
                kd.temperature,
                kd.task_weight,
                kd.distill_weight,
            )
        self.task = self.method_cls(
            model,
            args.method_kwargs,
            mixup_fn=self.mixup_fn,
            smoothing=args.smoothing,
            bce=build.create_bce(args, mixup=self.mixup_fn is not None),
            teacher=teacher,
            kd=kd,
            normalization=(self.data_config["mean"], self.data_config["std"]),
            device=ctx.device,
        )
        if args.sync_bn and ctx.distributed:
            self.task.trainable_module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
                self.task.trainable_module
            )
        self.task.to(ctx.device)
        if args.channels_last:
            self.task.to(memory_format=torch.channels_last)

        args.lr = build.resolve_lr(args, ctx.world_size)
        # The trainable module: the model and whatever the method trains besides it, never a teacher.
        self.optimizer = build.create_optimizer(args, self.task.get_trainable_module())
        self.autocast = autocast_context(args, ctx.device)
        self.scaler = (
            torch.amp.GradScaler(ctx.device.type) if args.amp and args.amp_dtype == "float16" else None
        )
        if args.model_ema:
            self.task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if ctx.distributed:
            # Only when asked: torch deprecates the argument, and True is its default.
            ddp_kwargs = {"broadcast_buffers": False} if args.no_ddp_bb else {}
            self.task.prepare_distributed(
                device_ids=[ctx.device] if ctx.device.type == "cuda" else None, **ddp_kwargs
            )
        if args.torchcompile:
            self.task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        seed_everything(args.seed + ctx.rank)
        self._first_bad_step = torch.zeros((), dtype=torch.int64, device=ctx.device)

        # An update every --grad-accum-steps batches, the last one taking whatever the epoch has left.
        self.updates_per_epoch = -(-len(self.train_loader) // args.grad_accum_steps)
        self.scheduler, self.num_epochs = build.create_scheduler(args, self.optimizer, self.updates_per_epoch)
        self.scalars, error = None, None
        if ctx.primary:
            try:
                self.scalars = ScalarLog(args, self.out_dir)
            except Exception as e:  # a missing extra or wandb refusing to start: no rank may wait on rank 0
                error = (
                    e if isinstance(e, ConfigError) else ConfigError(f"--log-wandb/--log-tensorboard: {e}")
                )
        ctx.fail_together(error)
        self.state = TrainState()
        if resume is not None:
            self._resume(*resume)
        remove_previous_run(args, ctx, self.out_dir)
        if ctx.primary:
            dump_args(args, self.out_dir / "args.yaml")

    # ----------------------------------------------------------------- checkpoints

    def _checkpoint_state(self, rng_states: list[dict]) -> dict:
        s = self.state
        state = {
            "arch": self.args.model,
            # timm's convention: the last completed epoch, version 2 (timm resumes at epoch + 1).
            "epoch": s.epoch - 1,
            "version": 2,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "metric": s.best_metric,  # timm's key: the best --eval-metric value so far
            "global_step": s.global_step,
            "resume_epoch": s.epoch,
            "resume_batch": s.batch_in_epoch,
            "best_epoch": s.best_epoch,
            "kept": s.kept,
            "epoch_sums": list(s.epoch_sums),
            "epoch_count": s.epoch_count,
            "sampler": self.sampler.state_dict(batches_consumed=s.batch_in_epoch),
            "rng": rng_states,
            "num_classes": self.args.num_classes,
            "class_names": self.train_index.classes,
            "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()},
        }
        state.update(self.task.get_checkpoint_state())
        if self.task.has_ema():
            state.update(self.task.get_checkpoint_state(ema=True))
        if self.scaler is not None:
            state["amp_scaler"] = self.scaler.state_dict()
        return state

    def save(self) -> None:
        """Every rank calls this: rank 0 gathers each rank's RNG state and writes ``last.pth.tar``.

        Non-finite weights are never written: the previous checkpoint stays the newest good one."""
        self._check_finite_weights()
        rng_states = [ckpt.rng_state()]
        if self.ctx.distributed:
            gathered = [None] * self.ctx.world_size if self.ctx.primary else None
            dist.gather_object(rng_states[0], gathered, dst=0)
            rng_states = gathered
        error = None
        if self.ctx.primary:
            try:
                ckpt.save_checkpoint(
                    self._checkpoint_state(rng_states), self.out_dir / ckpt.LAST, keep_previous=True
                )
            except OSError as e:  # a full disk or quota: every rank stops, none waits for rank 0
                error = ckpt.CheckpointError(f"cannot write {self.out_dir / ckpt.LAST}: {e}")
        self.ctx.fail_together(error)

    def _check_finite_weights(self) -> None:
        tensors = [t for t in self.task.get_trainable_module().state_dict().values() if t.is_floating_point()]
        if self.task.has_ema():
            ema = self.task.get_trainable_module(ema=True).state_dict().values()
            tensors += [t for t in ema if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()
        if self.ctx.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise TrainingDivergedError(
                f"the weights are NaN/inf at step {self.state.global_step} (epoch {self.state.epoch + 1}): "
                f"not saving, {self.out_dir / ckpt.LAST} keeps the last good state; {DIVERGED_HINT}"
            )

    def _load_resume_checkpoint(self, resume: str) -> tuple[Path, dict] | None:
        """Rank 0 chooses the checkpoint, every rank reads that file from its own view of the experiment
        folder, and all ranks fail together if one cannot: never one rank resuming while another starts."""
        ctx, found, error, state = self.ctx, None, None, None
        if resume == "auto":
            if ctx.primary:
                found = ckpt.find_resume_checkpoint(self.out_dir)
            name = ctx.broadcast(None if found is None else found[0].name)
            if name is None:
                _logger.info("--resume auto: no checkpoint in %s, starting fresh", self.out_dir)
                return None
            path = self.out_dir / name
        else:
            path = Path(resume)
        try:
            state = found[1] if found is not None else ckpt.load_checkpoint_file(path)
            if "global_step" not in state:
                raise ckpt.CheckpointError(
                    f"{path} is not a timm-cskd training checkpoint (no training position)"
                )
        except ckpt.CheckpointError as e:
            hint = (
                " (every node must see the experiment folder: put --output on shared storage)"
                if ctx.distributed
                else ""
            )
            error = ckpt.CheckpointError(f"{e}{hint}")
        ctx.fail_together(error)
        steps = ctx.gather(state["global_step"])
        if len(set(steps)) > 1:
            raise ckpt.CheckpointError(
                f"the ranks read different checkpoints named {path} (global steps {steps}): "
                "every node must see the same experiment folder"
            )
        return path, state

    def _resume(self, path: Path, state: dict) -> None:
        args, ctx = self.args, self.ctx
        try:
            self.task.load_checkpoint_state(state["state_dict"], state.get("task_state"))
            if self.task.has_ema() and "state_dict_ema" in state:
                self.task.load_checkpoint_state(
                    state["state_dict_ema"], state.get("task_state_ema"), ema=True
                )
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"{path} does not fit --model {args.model}: {e}") from e
        if not args.no_resume_opt:
            self.optimizer.load_state_dict(state["optimizer"])
        elastic = self.sampler.is_elastic(state["sampler"]) or len(state["rng"]) != ctx.world_size
        saved_epochs = state.get("args", {}).get("epochs", args.epochs)
        if saved_epochs != args.epochs:
            # timm's resume does the same: the schedule is created for the new length; the saved one
            # would keep the old length (a finished cosine run would train on at its final lr, often 0).
            _logger.info(
                "--epochs %d differs from the %d the checkpoint was trained for: the %s schedule is rebuilt "
                "for %d epochs and continues at epoch %d of it",
                args.epochs,
                saved_epochs,
                args.sched,
                args.epochs,
                state["resume_epoch"] + 1,
            )
        # The scheduler counts updates: with another rank count or batch an epoch has another number of
        # them, so it is rebuilt for this run and placed at the same epoch position below.
        rebuilt = elastic or saved_epochs != args.epochs
        if self.scheduler is not None and state.get("scheduler") is not None and not rebuilt:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "amp_scaler" in state and not args.no_resume_opt:
            self.scaler.load_state_dict(state["amp_scaler"])
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"{path} cannot continue with these settings: {e}") from e
        epoch, batch = state["resume_epoch"], self.sampler.position
        self.state = TrainState(
            epoch=epoch,
            batch_in_epoch=batch,
            global_step=epoch * self.updates_per_epoch + -(-batch // args.grad_accum_steps),
            best_metric=state["metric"],
            best_epoch=state["best_epoch"],
            kept=list(state.get("kept", [])),
            # Rank 0 carries the saved sums of the epoch; the others start theirs at zero.
            epoch_sums=list(state["epoch_sums"]) if ctx.primary else [0.0, 0.0, 0.0],
            epoch_count=state.get("epoch_count", state["resume_batch"]) if ctx.primary else 0,
        )
        if elastic:
            saved = state["sampler"]
            seed_everything(args.seed + ctx.rank + 1000 * self.state.global_step)
            _logger.warning(
                "elastic resume: saved by %d rank(s) x batch %s, continuing on %d x %d from sample position %d "
                "of epoch %d (batch %d of %d); the rest of the epoch is re-sharded, augmentation and Mixup "
                "randomness is not replayed exactly",
                len(state["rng"]),
                saved.get("batch_size"),
                ctx.world_size,
                args.batch_size,
                self.sampler.state_dict()["units_consumed"],
                epoch + 1,
                batch,
                self.updates_per_epoch,
            )
        else:
            ckpt.set_rng_state(state["rng"][ctx.rank])
        if self.scheduler is not None:  # the learning rate where the run stopped (timm's resume does this)
            if args.sched_on_updates:
                self.scheduler.step_update(self.state.global_step)
            else:
                self.scheduler.step(self.state.epoch)
        _logger.info(
            "resumed from %s at epoch %d, batch %d (step %d)",
            path,
            self.state.epoch,
            self.state.batch_in_epoch,
            self.state.global_step,
        )

    # ----------------------------------------------------------------- loop

    def _train_step(self, images, target, accum: int, update: bool):
        """Forward and backward one batch; step the optimizer when ``update`` (the last of ``accum``
        accumulated batches, each loss divided by ``accum`` as timm does)."""
        args, ctx = self.args, self.ctx
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

        def to_device(x):
            # A no-op for the torch backend's batches, which arrive finished on the device.
            return x.to(ctx.device, non_blocking=True).contiguous(memory_format=memory_format)

        # A method with several augmented views per image gets a list of view batches.
        images = [to_device(v) for v in images] if isinstance(images, list | tuple) else to_device(images)
        target = target.to(ctx.device, non_blocking=True)
        result = train_step(
            self.task,
            self.optimizer,
            images,
            target,
            autocast=self.autocast,
            scaler=self.scaler,
            accum=accum,
            update=update,
            clip_grad=args.clip_grad,
            clip_mode=args.clip_mode,
            synchronize=args.synchronize_step,
        )
        loss = result["loss"]
        terms = torch.stack([loss.detach(), result["ce"], result["reg"]]).double()
        # Remember the first non-finite step on the device: no host sync until the next agreement.
        self._first_bad_step = torch.where(
            torch.isfinite(terms[0]) | (self._first_bad_step > 0),
            self._first_bad_step,
            NO_STEP - self.state.global_step - 1,
        )
        return terms

    def _agree(self, stop: StopFlag, check_finite: bool = True) -> bool:
        """Whether any rank was asked to stop; raises on every rank if any rank saw a non-finite loss.

        All ranks stop at the same step, or one would wait forever in the next all-reduce."""
        ctx = self.ctx
        if not ctx.distributed and not check_finite:
            return stop.requested
        flags = torch.stack(
            [torch.tensor(float(stop.requested), device=ctx.device), self._first_bad_step.double()]
        )
        if ctx.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        requested, bad = flags.tolist()
        if bad:
            step = NO_STEP - int(bad)
            raise TrainingDivergedError(
                f"the loss became NaN/inf at step {step} (epoch {self.state.epoch + 1}); stopped before saving, "
                f"so {self.out_dir / ckpt.LAST} keeps the last good state; {DIVERGED_HINT}"
            )
        return bool(requested)

    def _save_mid_epoch(self, sums: torch.Tensor, local_batches: int, count_before: int) -> None:
        """Record the epoch's global loss sums (a collective, as save is) and write the checkpoint."""
        state, ctx = self.state, self.ctx
        total = sums.clone()
        if ctx.distributed:
            dist.all_reduce(total)
        state.epoch_sums = total.tolist()
        state.epoch_count = count_before + local_batches * ctx.world_size
        self.save()

    def train_epoch(self, epoch: int, stop: StopFlag) -> dict[str, float] | None:
        """One epoch from the current position; returns its mean loss terms, or None when stopped.

        ``state.batch_in_epoch`` counts loader batches, ``state.global_step`` optimizer updates (the
        schedule's clock); position checks, logs and checkpoints happen only between updates."""
        args, ctx, state = self.args, self.ctx, self.state
        self.sampler.set_epoch(epoch)
        self.task.train()
        if self.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False
        # Rank 0 starts from the saved global sums of a resumed epoch, the other ranks from zero.
        sums = torch.tensor(state.epoch_sums, dtype=torch.float64, device=ctx.device)
        count_before, local_batches = state.epoch_count, 0
        window_start, window_steps = time.perf_counter(), 0
        total_steps = self.num_epochs * self.updates_per_epoch
        batches, accum = len(self.train_loader), args.grad_accum_steps
        # Updates group --grad-accum-steps batches from where this pass starts (an elastic resume may start
        # between an uninterrupted run's groups); the epoch's last update takes what is left.
        start = state.batch_in_epoch
        for images, target in self.train_loader:
            group = start + (state.batch_in_epoch - start) // accum * accum
            group_size = min(accum, batches - group)
            update = (state.batch_in_epoch + 1 - group) == group_size
            sums += self._train_step(images, target, group_size, update)
            state.batch_in_epoch += 1
            local_batches += 1
            if not update:
                continue
            state.global_step += 1
            window_steps += 1
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=state.global_step)
            self.task.update_ema(step=state.global_step)

            last_batch = state.batch_in_epoch == batches
            at_log = state.global_step % args.log_interval == 0 or last_batch
            at_checkpoint = args.checkpoint_interval and state.global_step % args.checkpoint_interval == 0
            if at_log:
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / window_steps
                self._log_progress(
                    epoch, sums, (count_before if ctx.primary else 0) + local_batches, step_time, total_steps
                )
                window_start, window_steps = time.perf_counter(), 0
            # Ranks agree only where they sync anyway; a single process checks the stop flag every step.
            synced = at_log or at_checkpoint
            if (synced or not ctx.distributed) and self._agree(stop, check_finite=synced):
                if not synced:
                    self._agree(stop)  # a diverged run is not saved
                self._save_mid_epoch(sums, local_batches, count_before)
                _logger.info(
                    "stop requested (SIGTERM): saved %s at step %d, exiting", ckpt.LAST, state.global_step
                )
                return None
            if at_checkpoint and not last_batch:
                self._save_mid_epoch(sums, local_batches, count_before)
        if ctx.distributed:
            dist.all_reduce(sums)
        # Rank-batches in this epoch, resumed ones included: the sums span them all.
        count = max(count_before + local_batches * ctx.world_size, 1)
        loss, ce, reg = (v / count for v in sums.tolist())
        return {"loss": loss, "ce": ce, "reg": reg}

    def _log_progress(self, epoch, sums, terms, step_time, total_steps):
        """Rank 0's running means over the epoch so far (as timm's train.py shows averages)."""
        if not self.ctx.primary:
            return
        s = self.state
        loss, ce, reg = (v / max(terms, 1) for v in sums.tolist())
        lr = self._lr()
        rate = self.args.batch_size * self.ctx.world_size * self.args.grad_accum_steps / step_time
        eta = (total_steps - s.global_step) * step_time
        batches = len(self.train_loader)
        _logger.info(
            "epoch %d/%d  batch %d/%d (%3.0f%%)  %.0f img/s  loss %.4f  ce %.4f  reg %.4f  lr %.4g  eta %s",
            epoch + 1,
            self.num_epochs,
            s.batch_in_epoch,
            batches,
            100.0 * s.batch_in_epoch / batches,
            rate,
            loss,
            ce,
            reg,
            lr,
            format_duration(eta),
        )

    def sync_batchnorm_stats(self) -> None:
        """DDP syncs gradients, not BatchNorm running stats: average them over ranks (as timm's --dist-bn)."""
        if not self.ctx.distributed or not self.args.dist_bn:
            return
        reduce = self.args.dist_bn == "reduce"
        distribute_bn(unwrap_model(self.task.get_trainable_module()), self.ctx.world_size, reduce)
        if self.task.has_ema():
            distribute_bn(self.task.get_trainable_module(ema=True), self.ctx.world_size, reduce)

    def validate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}

        def run(model):
            return evaluate(
                unwrap_model(model),
                self.val_loader,
                self.ctx.device,
                autocast=self.autocast,
                channels_last=self.args.channels_last,
                num_bins=self.args.ece_bins,
            ).meter.compute()

        metrics = run(self.task.get_eval_model())
        if self.task.has_ema():
            ema_metrics = run(self.task.get_eval_model(ema=True))
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "num_samples"})
        return metrics

    def fit(self) -> dict[str, float]:
        args, state = self.args, self.state
        _logger.info(
            "training %s (method %s) on %d images, %d classes, %d rank(s) x batch %d, %d steps/epoch, lr %.4g -> %s",
            args.model,
            args.method,
            len(self.train_index),
            self.train_index.num_classes,
            self.ctx.world_size,
            args.batch_size,
            self.updates_per_epoch,
            args.lr,
            self.out_dir,
        )
        metrics: dict[str, float] = {}
        with StopFlag() as stop:
            while state.epoch < self.num_epochs:
                epoch = state.epoch
                epoch_start = time.perf_counter()
                batches_before = state.batch_in_epoch
                train_metrics = self.train_epoch(epoch, stop)
                if train_metrics is None:
                    return {}
                seconds = time.perf_counter() - epoch_start
                images = (state.batch_in_epoch - batches_before) * args.batch_size * self.ctx.world_size
                train_metrics["img_per_sec"] = images / seconds
                self.sync_batchnorm_stats()
                # Every --val-interval epochs and at the last (timm's meaning).
                last_epoch = epoch + 1 == self.num_epochs
                metrics = self.validate() if last_epoch or (epoch + 1) % args.val_interval == 0 else {}
                lr = self._lr()
                value = self._eval_value(metrics) if metrics else None
                state.epoch, state.batch_in_epoch = epoch + 1, 0
                state.epoch_sums, state.epoch_count = [0.0, 0.0, 0.0], 0
                is_best = value is not None and (
                    state.best_metric is None or self._better(value, state.best_metric)
                )
                if is_best:
                    state.best_metric, state.best_epoch = value, epoch
                if self.scheduler is not None:
                    self.scheduler.step(epoch + 1, value)
                dropped = self._keep_checkpoint(value, epoch)
                error = None
                if self.ctx.primary:
                    error = self._record_epoch(epoch, train_metrics, metrics, lr)
                self.ctx.fail_together(error)
                # Commit the finished epoch to last.pth.tar (atomic), then copy it where it belongs.
                self.save()
                if self.ctx.primary:
                    error = self._copy_epoch_checkpoints(epoch, is_best, dropped) or self._write_status()
                self.ctx.fail_together(error)
                # A notice that came during validation or the save: stop now, not after more steps.
                if state.epoch < self.num_epochs and self._agree(stop, check_finite=False):
                    _logger.info(
                        "stop requested (SIGTERM): saved %s at the end of epoch %d, exiting",
                        ckpt.LAST,
                        epoch + 1,
                    )
                    return {}
        return metrics

    def _write_status(self) -> Exception | None:
        """Rank 0: ``status.json``, the epochs this run plans (the schedule's count: cooldown and a
        warmup prefix included) and has finished, so a caller can tell a finished run from a stopped one."""
        status = {
            "epochs_planned": self.num_epochs,
            "epochs_done": self.state.epoch,
            "finished": self.state.epoch >= self.num_epochs,
        }
        try:
            write_atomic(self.out_dir / "status.json", json.dumps(status))
        except OSError as e:
            return ckpt.CheckpointError(f"cannot write {self.out_dir / 'status.json'}: {e}")
        return None

    def _lr(self) -> float:
        """The mean learning rate over parameter groups, as timm logs it (layer decay scales groups)."""
        groups = self.optimizer.param_groups
        return sum(g["lr"] for g in groups) / len(groups)

    def _eval_value(self, metrics: dict) -> float:
        """timm's --eval-metric as timm's checkpoint ``metric`` holds it: top-1/top-5 accuracy in percent
        (higher is better) or the validation loss (lower is better); the EMA's when there is one (timm)."""
        prefix = "ema_" if self.task.has_ema() else ""
        if self.args.eval_metric == "loss":
            return metrics[f"{prefix}nll"]
        return 100.0 - metrics[f"{prefix}{self.args.eval_metric}_err"]

    def _better(self, value: float, than: float) -> bool:
        return value < than if self.args.eval_metric == "loss" else value > than

    def _keep_checkpoint(self, value: float | None, epoch: int) -> list[int]:
        """--checkpoint-hist: whether this epoch joins the kept best checkpoints; the epochs it displaces."""
        keep = self.args.checkpoint_hist
        if value is None or keep <= 0:
            return []
        kept = sorted(
            self.state.kept + [[value, epoch]],
            key=lambda item: item[0],
            reverse=self.args.eval_metric != "loss",
        )
        self.state.kept = kept[:keep]
        return [e for _, e in kept[keep:]]

    def _record_epoch(self, epoch: int, train_metrics: dict, metrics: dict, lr: float) -> Exception | None:
        """Rank 0: the epoch's row in summary.csv (and wandb/TensorBoard), and its log line."""
        # The same columns every epoch (empty when not validated): the CSV header is the first row's.
        prefixes = ("", "ema_") if self.task.has_ema() else ("",)
        keys = [f"{p}{k}" for p in prefixes for k in ("nll", "top1_err", "top5_err", "ece")]
        eval_row = {k: metrics.get(k, "") for k in keys} if self.val_loader is not None else {}
        if metrics:
            _logger.info(
                "epoch %d/%d validation: top-1 err %.2f%%  top-5 err %.2f%%  NLL %.4f  ECE %.2f%%  (%d images)",
                epoch + 1,
                self.num_epochs,
                metrics["top1_err"],
                metrics["top5_err"],
                metrics["nll"],
                metrics["ece"],
                metrics["num_samples"],
            )
        try:
            update_summary(epoch, train_metrics, eval_row, self.out_dir / "summary.csv", lr=lr)
            self.scalars.log(epoch, train_metrics, {k: v for k, v in eval_row.items() if v != ""}, lr)
        except OSError as e:
            return ckpt.CheckpointError(f"cannot write {self.out_dir / 'summary.csv'}: {e}")
        return None

    def _copy_epoch_checkpoints(self, epoch: int, is_best: bool, dropped: list[int]) -> Exception | None:
        """Rank 0: last.pth.tar copied to model_best and to this epoch's kept checkpoint; displaced ones go."""
        last = self.out_dir / ckpt.LAST
        targets = [self.out_dir / ckpt.BEST] if is_best else []
        if any(e == epoch for _, e in self.state.kept):
            targets.append(self.out_dir / f"checkpoint-{epoch}.pth.tar")
        try:
            for target in targets:
                ckpt.copy_checkpoint(last, target)
            for old in dropped:
                (self.out_dir / f"checkpoint-{old}.pth.tar").unlink(missing_ok=True)
        except OSError as e:
            return ckpt.CheckpointError(f"cannot copy {last}: {e}")
        return None

    def close(self) -> None:
        if getattr(self, "scalars", None) is not None:
            self.scalars.close()
            self.scalars = None
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None
        if self.ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> dict[str, float]:
    trainer = Trainer(args)
    try:
        metrics = trainer.fit()
    finally:
        trainer.close()
    if trainer.ctx.primary and metrics:
        print_final_table(trainer, metrics)
    return metrics


def print_final_table(trainer: Trainer, metrics: dict[str, float]) -> None:
    rows = [
        ("top-1 error (%)", f"{metrics['top1_err']:.2f}"),
        ("top-5 error (%)", f"{metrics['top5_err']:.2f}"),
        ("NLL", f"{metrics['nll']:.4f}"),
        (f"ECE, {trainer.args.ece_bins} bins (%)", f"{metrics['ece']:.2f}"),
        ("Brier", f"{metrics['brier']:.4f}"),
        ("validation images", f"{metrics['num_samples']}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\nFinal metrics ({trainer.args.model}, method '{trainer.args.method}'):")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>8}")
    print(
        f"Outputs in {trainer.out_dir.resolve()}: summary.csv, args.yaml, log.txt, {ckpt.LAST}, {ckpt.BEST}"
    )


def main(argv: list[str] | None = None, default_config: str | os.PathLike | None = None) -> int:
    try:
        args = parse_args(argv, default_config)
        if args.list_methods:
            print(describe_methods())
            return 0
        run(args)
    except (ConfigError, DataIndexError, ckpt.CheckpointError, RunLockedError, TrainingDivergedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The trainer's command (``timm-cskd train``, ``python -m timm_cskd.train``, ``train_imagenet.py``):
    with neither ``--config`` nor ``--data-dir`` it runs the demo."""
    return main(argv, default_config=DEMO_CONFIG)


if __name__ == "__main__":
    sys.exit(cli())
