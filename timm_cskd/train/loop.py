"""The training loop (``Trainer``): steps with gradient accumulation, the schedule, EMA, logging,
validation, mid-epoch and end-of-epoch checkpoints, with every rank agreeing where it stops.

The parts come from the composition root (``assemble``), the position and resume from ``state``, the
stop and divergence checks from ``guards``, and what each epoch writes from ``records``.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.distributed as dist
from timm.utils import distribute_bn
from timm.utils.model import unwrap_model

from timm_cskd import checkpoint as ckpt
from timm_cskd.config import RunConfig, dump_args
from timm_cskd.data.shard_index import ShardIndex
from timm_cskd.distributed import setup_context
from timm_cskd.evaluation import evaluate
from timm_cskd.experiment import open_experiment, remove_previous_run, resolve_run, setup_logging
from timm_cskd.naming import format_duration
from timm_cskd.step import train_step
from timm_cskd.stop_flag import StopFlag
from timm_cskd.train import records
from timm_cskd.train.assemble import assemble
from timm_cskd.train.guards import agree, check_finite_weights, mark_non_finite
from timm_cskd.train.state import TrainState, checkpoint_state, load_resume_checkpoint, restore

__all__ = ["Trainer"]

_logger = logging.getLogger("timm_cskd.train")


class Trainer:
    """One training run of ``config`` (a ``RunConfig``; a parsed command line converts to one); its
    final ``config`` and its parts (``task``, ``optimizer``, ``train_loader``, ...) are ``assemble``'s.

    Given a namespace, the trainer also writes the resolved values back into it once built (the method,
    the learning rate, the class count, the experiment name), as timm's train.py leaves its ``args``."""

    def __init__(self, config: RunConfig | argparse.Namespace):
        namespace = config if isinstance(config, argparse.Namespace) else None
        if namespace is not None:
            config = RunConfig.from_namespace(namespace)
        run = resolve_run(config)
        self.method_cls, self.config = run.method_cls, run.config
        self.ctx = ctx = setup_context(run.config.runtime)
        self.out_dir, self.lock, experiment = open_experiment(run.config, ctx)
        try:
            self._restore_logging = setup_logging(ctx, self.out_dir / "log.txt")
            resume_from = run.config.output.resume
            resume = load_resume_checkpoint(ctx, self.out_dir, resume_from) if resume_from else None
            saved_args = resume[1].get("args", {}) if resume is not None else None
            vars(self).update(vars(assemble(run, ctx, self.out_dir, experiment, saved_args)))
            if namespace is not None:
                vars(namespace).update(self.config.to_dict())
            # summary.csv's train_* columns: the total, the task term, the rest, then the method's own terms.
            self.columns = ("loss", "ce", "reg", *(t for t in self.task.term_names if t != "ce"))
            self._first_bad_step = torch.zeros((), dtype=torch.int64, device=ctx.device)
            self.state = TrainState(epoch_sums=[0.0] * len(self.columns))
            if resume is not None:
                self.state = restore(self, *resume, columns=self.columns)
            remove_previous_run(self.config.output, ctx, self.out_dir)
            if ctx.primary:
                dump_args(self.config.to_dict(), self.out_dir / "args.yaml")
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- checkpoints

    def save(self) -> None:
        """Every rank calls this: rank 0 gathers each rank's RNG state and writes ``last.pth.tar``.

        Non-finite weights are never written: the previous checkpoint stays the newest good one."""
        last = self.out_dir / ckpt.LAST
        check_finite_weights(
            self.task, self.ctx, step=self.state.global_step, epoch=self.state.epoch, last=last
        )
        rng_states = [ckpt.rng_state()]
        if self.ctx.distributed:
            gathered = [None] * self.ctx.world_size if self.ctx.primary else None
            dist.gather_object(rng_states[0], gathered, dst=0)
            rng_states = gathered
        error = None
        if self.ctx.primary:
            try:
                ckpt.save_checkpoint(checkpoint_state(self, self.state, rng_states), last, keep_previous=True)
            except OSError as e:  # a full disk or quota: every rank stops, none waits for rank 0
                error = ckpt.CheckpointError(f"cannot write {last}: {e}")
        self.ctx.fail_together(error)

    def _save_mid_epoch(self, sums: torch.Tensor, local_batches: int, count_before: int) -> None:
        """Record the epoch's global loss sums (a collective, as save is) and write the checkpoint."""
        state, ctx = self.state, self.ctx
        total = sums.clone()
        if ctx.distributed:
            dist.all_reduce(total)
        state.epoch_sums = total.tolist()
        state.epoch_count = count_before + local_batches * ctx.world_size
        self.save()

    # ----------------------------------------------------------------- loop

    def _train_step(self, images, target, accum: int, update: bool):
        """Forward and backward one batch; step the optimizer when ``update`` (the last of ``accum``
        accumulated batches, each loss divided by ``accum`` as timm does). Returns the batch's
        ``columns`` on the device."""
        config, ctx = self.config, self.ctx
        memory_format = torch.channels_last if config.data.channels_last else torch.contiguous_format

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
            clip_grad=config.optim.clip_grad,
            clip_mode=config.optim.clip_mode,
            synchronize=config.runtime.synchronize_step,
        )
        own = [result["terms"][name] for name in self.columns[3:]]
        terms = torch.stack([result["loss"].detach(), result["ce"], result["reg"], *own]).double()
        # Remember the first non-finite step on the device: no host sync until the next agreement.
        self._first_bad_step = mark_non_finite(self._first_bad_step, terms[0], self.state.global_step)
        return terms

    def _agree(self, stop: StopFlag, check_finite: bool = True) -> bool:
        """Whether any rank was asked to stop; raises on every rank if any rank saw a non-finite loss."""
        return agree(
            self.ctx,
            stop,
            self._first_bad_step,
            check_finite=check_finite,
            epoch=self.state.epoch,
            last=self.out_dir / ckpt.LAST,
        )

    def train_epoch(self, epoch: int, stop: StopFlag) -> dict[str, float] | None:
        """One epoch from the current position; returns its mean loss columns, or None when stopped.

        ``state.batch_in_epoch`` counts loader batches, ``state.global_step`` optimizer updates (the
        schedule's clock); position checks, logs and checkpoints happen only between updates."""
        ctx, state = self.ctx, self.state
        data, optim, out = self.config.data, self.config.optim, self.config.output
        self.sampler.set_epoch(epoch)
        self.task.train()
        if self.mixup_fn is not None and data.mixup_off_epoch and epoch >= data.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False
        # Rank 0 starts from the saved global sums of a resumed epoch, the other ranks from zero.
        sums = torch.tensor(state.epoch_sums, dtype=torch.float64, device=ctx.device)
        count_before, local_batches = state.epoch_count, 0
        window_start, window_steps = time.perf_counter(), 0
        total_steps = self.num_epochs * self.updates_per_epoch
        batches, accum = len(self.train_loader), optim.grad_accum_steps
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
            at_log = state.global_step % out.log_interval == 0 or last_batch
            at_checkpoint = out.checkpoint_interval and state.global_step % out.checkpoint_interval == 0
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
        return dict(zip(self.columns, (v / count for v in sums.tolist())))

    def _log_progress(self, epoch, sums, terms, step_time, total_steps):
        """Rank 0's running means over the epoch so far (as timm's train.py shows averages)."""
        if not self.ctx.primary:
            return
        s = self.state
        means = "  ".join(f"{name} {v / max(terms, 1):.4f}" for name, v in zip(self.columns, sums.tolist()))
        rate = (
            self.config.data.batch_size * self.ctx.world_size * self.config.optim.grad_accum_steps / step_time
        )
        eta = (total_steps - s.global_step) * step_time
        batches = len(self.train_loader)
        _logger.info(
            "epoch %d/%d  batch %d/%d (%3.0f%%)  %.0f img/s  %s  lr %.4g  eta %s",
            epoch + 1,
            self.num_epochs,
            s.batch_in_epoch,
            batches,
            100.0 * s.batch_in_epoch / batches,
            rate,
            means,
            self._lr(),
            format_duration(eta),
        )

    def sync_batchnorm_stats(self) -> None:
        """DDP syncs gradients, not BatchNorm running stats: average them over ranks (as timm's --dist-bn)."""
        if not self.ctx.distributed or not self.config.runtime.dist_bn:
            return
        reduce = self.config.runtime.dist_bn == "reduce"
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
                channels_last=self.config.data.channels_last,
                num_bins=self.config.output.ece_bins,
            ).meter.compute()

        metrics = run(self.task.get_eval_model())
        if self.task.has_ema():
            ema_metrics = run(self.task.get_eval_model(ema=True))
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "num_samples"})
        return metrics

    def fit(self) -> dict[str, float]:
        config, state, ctx = self.config, self.state, self.ctx
        out = config.output
        _logger.info(
            "training %s (method %s) on %d images%s, %d classes, %d rank(s) x batch %d, %d steps/epoch, lr %.4g -> %s",
            config.model.model,
            config.method.method,
            len(self.train_index),
            " (rank 0's shards)" if isinstance(self.train_index, ShardIndex) else "",
            self.train_index.num_classes,
            ctx.world_size,
            config.data.batch_size,
            self.updates_per_epoch,
            config.optim.lr,
            self.out_dir,
        )
        metrics: dict[str, float] = {}
        ema = self.task.has_ema()
        with StopFlag() as stop:
            while state.epoch < self.num_epochs:
                epoch = state.epoch
                epoch_start = time.perf_counter()
                batches_before = state.batch_in_epoch
                train_metrics = self.train_epoch(epoch, stop)
                if train_metrics is None:
                    return {}
                seconds = time.perf_counter() - epoch_start
                images = (state.batch_in_epoch - batches_before) * config.data.batch_size * ctx.world_size
                train_metrics["img_per_sec"] = images / seconds
                self.sync_batchnorm_stats()
                # Every --val-interval epochs and at the last (timm's meaning).
                last_epoch = epoch + 1 == self.num_epochs
                metrics = self.validate() if last_epoch or (epoch + 1) % out.val_interval == 0 else {}
                lr = self._lr()
                value = records.eval_value(metrics, out.eval_metric, ema) if metrics else None
                state.epoch, state.batch_in_epoch = epoch + 1, 0
                state.epoch_sums, state.epoch_count = [0.0] * len(self.columns), 0
                is_best = value is not None and (
                    state.best_metric is None or records.is_better(value, state.best_metric, out.eval_metric)
                )
                if is_best:
                    state.best_metric, state.best_epoch = value, epoch
                if self.scheduler is not None:
                    self.scheduler.step(epoch + 1, value)
                state.kept, dropped = records.keep_checkpoint(
                    state.kept, value, epoch, out.checkpoint_hist, out.eval_metric
                )
                error = None
                if ctx.primary:
                    error = records.record_epoch(
                        self.out_dir,
                        self.scalars,
                        epoch,
                        self.num_epochs,
                        train_metrics,
                        metrics,
                        lr,
                        ema=ema,
                        validates=self.val_loader is not None,
                    )
                ctx.fail_together(error)
                # Commit the finished epoch to last.pth.tar (atomic), then copy it where it belongs.
                self.save()
                if ctx.primary:
                    error = records.copy_epoch_checkpoints(
                        self.out_dir, epoch, is_best, state.kept, dropped
                    ) or records.write_status(self.out_dir, self.num_epochs, state.epoch)
                ctx.fail_together(error)
                # A notice that came during validation or the save: stop now, not after more steps.
                if state.epoch < self.num_epochs and self._agree(stop, check_finite=False):
                    _logger.info(
                        "stop requested (SIGTERM): saved %s at the end of epoch %d, exiting",
                        ckpt.LAST,
                        epoch + 1,
                    )
                    return {}
        return metrics

    def _lr(self) -> float:
        """The mean learning rate over parameter groups, as timm logs it (layer decay scales groups)."""
        groups = self.optimizer.param_groups
        return sum(g["lr"] for g in groups) / len(groups)

    def close(self) -> None:
        if getattr(self, "scalars", None) is not None:
            self.scalars.close()
            self.scalars = None
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None
        if self.ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()
        if getattr(self, "_restore_logging", None) is not None:
            self._restore_logging()
            self._restore_logging = None
