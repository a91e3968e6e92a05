"""The training job behind ``train_imagenet.py``: DDP from torchrun's environment, torch AMP, CS-KD as a
timm TrainingTask, timm's optimizer/scheduler/EMA, exact mid-epoch resume and SIGTERM checkpoints.

``run(args)`` trains and returns the final validation metrics; ``main(argv)`` is the command line.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import distribute_bn, update_summary
from timm.utils.model import unwrap_model

from timm_cskd import checkpoint as ckpt
from timm_cskd.config import ConfigError, dump_args, parse_args
from timm_cskd.data.index import VAL_SPLITS, DataIndexError, build_index, find_split
from timm_cskd.data.loader import SeededBatches, build_transforms, create_train_loader, create_val_loader
from timm_cskd.data.verify import read_exclude_list
from timm_cskd.distributed import Context, setup_context
from timm_cskd.evaluate import evaluate
from timm_cskd.methods import Method, describe_methods, kd_config, resolve_method
from timm_cskd.run_lock import RunLock, RunLockedError
from timm_cskd.teacher import load_teacher

__all__ = ["Trainer", "TrainingDivergedError", "run", "main"]

_logger = logging.getLogger("timm_cskd.train")

STOP_SIGNALS = (signal.SIGTERM,)
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
    # This epoch's loss terms (loss, ce, reg) summed over all ranks' batches so far, and how many
    # rank-batches that is: a resumed epoch, on any number of ranks, reports its means whole.
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_count: int = 0


def setup_logging(ctx: Context, log_file: Path | None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    level = logging.INFO if ctx.primary else logging.WARNING
    fmt = logging.Formatter(
        "%(asctime)s %(message)s" if ctx.primary else f"[rank {ctx.rank}] %(message)s", "%H:%M:%S"
    )
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if log_file is not None and ctx.primary:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)
    root.setLevel(level)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - timm's Mixup uses the global RNG
    torch.manual_seed(seed)


def open_experiment(args, ctx: Context) -> tuple[Path, RunLock | None]:
    """The experiment folder, locked by rank 0 for the run's life; every rank fails alike if it cannot."""
    name = args.experiment
    if name is None:
        if args.resume == "auto":
            raise ConfigError("--resume auto needs --experiment to know which folder to resume")
        name = [f"{args.model}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if ctx.distributed:
            dist.broadcast_object_list(name, src=0)
        name = name[0]
        args.experiment = name
    folder = Path(args.output) / name
    lock, error = None, None
    if ctx.primary:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = RunLock(folder)
            lock.acquire()
            previous = [
                folder / f
                for f in (ckpt.LAST, ckpt.PREVIOUS, ckpt.BEST, "summary.csv")
                if (folder / f).exists()
            ]
            if previous and not args.resume:
                if not args.overwrite:
                    raise ConfigError(
                        f"{folder} already holds a training run: pass --resume auto to continue it, --overwrite "
                        "to start it over (its checkpoints and summary are deleted), or another --experiment"
                    )
                for path in previous:
                    path.unlink()
        except (ConfigError, RunLockedError, OSError) as e:
            if lock is not None:
                lock.release()
                lock = None
            error = e
    ctx.fail_together(error)
    return folder, lock


def resolve_data_dir(args, ctx: Context) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir)
    from timm_cskd.data.demo import demo_data_dir

    if ctx.primary:
        demo_data_dir()
    ctx.barrier()
    return demo_data_dir()


def load_indices(args, ctx: Context, out_dir: Path):
    """Train/val indices. Rank 0 scans (and caches) first, then the other ranks read its cache."""
    data_dir = resolve_data_dir(args, ctx)
    if not data_dir.is_dir():
        raise DataIndexError(f"--data-dir {data_dir} does not exist or is not a folder")
    train_path = find_split(data_dir, [args.train_split])
    if train_path is None:
        raise DataIndexError(f"no '{args.train_split}' folder or list file in {data_dir}")
    val_path = find_split(data_dir, [args.val_split] if args.val_split else VAL_SPLITS)
    cache_dir = out_dir / "index-cache"

    def build():
        train = build_index(train_path, cache_dir=cache_dir, num_classes=args.num_classes)
        val = None
        if val_path is not None:
            val = build_index(
                val_path, cache_dir=cache_dir, num_classes=train.num_classes, classes=train.classes
            )
        return train, val

    # Rank 0 scans first (minutes on network storage); the other ranks then read its cache.
    indices, error = None, None
    if ctx.primary:
        try:
            indices = build()
        except (DataIndexError, OSError) as e:
            error = e
    ctx.fail_together(error, slow=True)
    if not ctx.primary:
        try:
            indices = build()
        except (DataIndexError, OSError) as e:
            error = e
    ctx.fail_together(error)
    train, val = indices
    if args.exclude_list:
        listed = [data_dir / line for line in read_exclude_list(args.exclude_list)]
        train, val = (None if index is None else index.without_files(listed) for index in (train, val))
        excluded = len(train.excluded) + (len(val.excluded) if val is not None else 0)
        _logger.info("excluding %d undecodable images listed in %s", excluded, args.exclude_list)
    return train, val


def create_model(args, num_classes: int) -> torch.nn.Module:
    if args.model not in timm.list_models() and not args.model.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model '{args.model}'{hint}")
    return timm.create_model(
        args.model, pretrained=args.pretrained, num_classes=num_classes, in_chans=args.in_chans
    )


def validate_args(args) -> type[Method]:
    """Check the flags together; resolve the method (``args.method``, ``args.method_kwargs`` become its
    name and full hyper-parameters, as args.yaml records them) and return its class."""
    method_cls, args.method_kwargs = resolve_method(args)
    args.method = method_cls.name
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if method_cls.batches == "paired" and args.batch_size % 2:
        raise ConfigError(
            f"--method {args.method} needs an even --batch-size (it counts images: pairs x 2), got {args.batch_size}"
        )
    if args.mixup > 0 or args.cutmix > 0:
        if not method_cls.mixup:
            raise ConfigError(
                f"--method {args.method} does not compose with Mixup/CutMix: {method_cls.mixup_note}"
            )
        if args.batch_size % 2:
            raise ConfigError(f"Mixup/CutMix needs an even --batch-size, got {args.batch_size}")
    if args.data_backend == "dali":
        importlib.import_module("timm_cskd.data.dali")  # raises with install instructions when missing
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if args.val_interval < 1:
        raise ConfigError(f"--val-interval must be >= 1, got {args.val_interval}")
    return method_cls


def autocast_context(args, device: torch.device):
    if not args.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class _StopFlag:
    """Set by SIGTERM (a scheduler's preemption notice); checked between steps."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
        if resume is not None and args.lr is None and resume[1].get("args", {}).get("lr") is not None:
            # The schedule continues as it started, also when the rank count (global batch) changed.
            args.lr = resume[1]["args"]["lr"]
        # The same initial weights on every rank (so is each rank's EMA copy); per-rank streams after.
        seed_everything(args.seed)

        self.train_index, self.val_index = load_indices(args, ctx, self.out_dir)
        num_classes = self.train_index.num_classes
        if args.num_classes is None:
            args.num_classes = num_classes
        model = self.method_cls.adapt_model(create_model(args, num_classes), args.method_kwargs)
        self.data_config = resolve_data_config(
            {
                "input_size": (args.in_chans, args.img_size, args.img_size),
                "crop_pct": args.crop_pct,
                "interpolation": args.interpolation,
                "mean": args.mean,
                "std": args.std,
            },
            model=model,
        )
        views = self.method_cls.views(args.method_kwargs)
        train_tf, val_tf = build_transforms(args, self.data_config, views)
        batches = self.method_cls.batches
        pin = ctx.device.type == "cuda"
        if args.data_backend == "dali":
            from timm_cskd.data.dali import create_dali_loaders

            self.train_loader, self.val_loader = create_dali_loaders(
                args, self.train_index, self.val_index, self.data_config, ctx, batches, len(views)
            )
        else:
            self.train_loader = create_train_loader(
                self.train_index,
                train_tf,
                args,
                batches=batches,
                num_replicas=ctx.world_size,
                rank=ctx.rank,
                pin_memory=pin,
            )
            self.val_loader = None
            if self.val_index is not None:
                self.val_loader = create_val_loader(
                    self.val_index,
                    val_tf,
                    args.validation_batch_size or 2 * args.batch_size,
                    num_replicas=ctx.world_size,
                    rank=ctx.rank,
                    workers=args.workers,
                    pin_memory=pin,
                )
        # The plan sampler itself (the torch loader wraps it to seed each sample's augmentation).
        batch_sampler = self.train_loader.batch_sampler
        self.sampler = (
            batch_sampler.batch_sampler if isinstance(batch_sampler, SeededBatches) else batch_sampler
        )

        mixup_fn = None
        if args.mixup > 0 or args.cutmix > 0:
            mixup_fn = Mixup(
                mixup_alpha=args.mixup,
                cutmix_alpha=args.cutmix,
                prob=args.mixup_prob,
                switch_prob=args.mixup_switch_prob,
                mode="batch",
                label_smoothing=args.smoothing,
                num_classes=num_classes,
            )
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
            mixup_fn=mixup_fn,
            smoothing=args.smoothing,
            teacher=teacher,
            kd=kd,
            device=ctx.device,
        )
        if args.sync_bn and ctx.distributed:
            self.task.trainable_module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
                self.task.trainable_module
            )
        self.task.to(ctx.device)
        if args.channels_last:
            self.task.to(memory_format=torch.channels_last)

        if args.lr is None:
            args.lr = args.lr_base * args.batch_size * ctx.world_size / 256
        # The trainable module: the model and whatever the method trains besides it, never a teacher.
        self.optimizer = create_optimizer_v2(
            self.task.get_trainable_module(),
            opt=args.opt,
            lr=args.lr,
            weight_decay=args.weight_decay,
            momentum=args.momentum,
            filter_bias_and_bn=not args.weight_decay_bias_bn,
        )
        self.autocast = autocast_context(args, ctx.device)
        self.scaler = (
            torch.amp.GradScaler(ctx.device.type) if args.amp and args.amp_dtype == "float16" else None
        )
        if args.model_ema:
            self.task.setup_ema(decay=args.model_ema_decay)
        if ctx.distributed:
            self.task.prepare_distributed(device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        if args.torchcompile:
            self.task.compile(backend=args.torchcompile)
        seed_everything(args.seed + ctx.rank)
        self._first_bad_step = torch.zeros((), dtype=torch.int64, device=ctx.device)

        self.updates_per_epoch = len(self.train_loader)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=args.sched,
            num_epochs=args.epochs,
            decay_milestones=args.decay_milestones,
            decay_rate=args.decay_rate,
            warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr,
            min_lr=args.min_lr,
            step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch,
        )
        self.state = TrainState()
        if resume is not None:
            self._resume(*resume)
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
            "metric": s.best_metric,  # timm's key: the best top-1 error so far
            "global_step": s.global_step,
            "resume_epoch": s.epoch,
            "resume_batch": s.batch_in_epoch,
            "best_epoch": s.best_epoch,
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
        self.optimizer.load_state_dict(state["optimizer"])
        elastic = self.sampler.is_elastic(state["sampler"]) or len(state["rng"]) != ctx.world_size
        # The scheduler counts updates: with another rank count or batch an epoch has another number of
        # them, so it is rebuilt for this run and placed at the same epoch position below.
        if self.scheduler is not None and state.get("scheduler") is not None and not elastic:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "amp_scaler" in state:
            self.scaler.load_state_dict(state["amp_scaler"])
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"{path} cannot continue with these settings: {e}") from e
        epoch, batch = state["resume_epoch"], self.sampler.position
        self.state = TrainState(
            epoch=epoch,
            batch_in_epoch=batch,
            global_step=epoch * self.updates_per_epoch + batch,
            best_metric=state["metric"],
            best_epoch=state["best_epoch"],
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
        _logger.info(
            "resumed from %s at epoch %d, batch %d (step %d)",
            path,
            self.state.epoch,
            self.state.batch_in_epoch,
            self.state.global_step,
        )

    # ----------------------------------------------------------------- loop

    def _train_step(self, images, target):
        args, ctx = self.args, self.ctx
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

        def to_device(x):
            return x.to(ctx.device, non_blocking=True).contiguous(memory_format=memory_format)

        # A method with several augmented views per image gets a list of view batches.
        images = [to_device(v) for v in images] if isinstance(images, list | tuple) else to_device(images)
        target = target.to(ctx.device, non_blocking=True)
        with self.autocast():
            result = self.task(images, target)
        loss = result["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.task.get_clip_parameters(), args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.task.get_clip_parameters(), args.clip_grad)
            self.optimizer.step()
        terms = torch.stack([loss.detach(), result["ce"], result["reg"]]).double()
        # Remember the first non-finite step on the device: no host sync until the next agreement.
        self._first_bad_step = torch.where(
            torch.isfinite(terms[0]) | (self._first_bad_step > 0),
            self._first_bad_step,
            NO_STEP - self.state.global_step - 1,
        )
        return terms

    def _agree(self, stop: _StopFlag, check_finite: bool = True) -> bool:
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

    def train_epoch(self, epoch: int, stop: _StopFlag) -> dict[str, float] | None:
        """One epoch from the current position; returns its mean loss terms, or None when stopped."""
        args, ctx, state = self.args, self.ctx, self.state
        self.sampler.set_epoch(epoch)
        self.task.train()
        # Rank 0 starts from the saved global sums of a resumed epoch, the other ranks from zero.
        sums = torch.tensor(state.epoch_sums, dtype=torch.float64, device=ctx.device)
        count_before, local_batches = state.epoch_count, 0
        window_start, window_steps = time.perf_counter(), 0
        total_steps = args.epochs * self.updates_per_epoch
        for images, target in self.train_loader:
            sums += self._train_step(images, target)
            state.batch_in_epoch += 1
            state.global_step += 1
            local_batches += 1
            window_steps += 1
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=state.global_step)
            self.task.update_ema(step=state.global_step)

            last_batch = state.batch_in_epoch == self.updates_per_epoch
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
        lr = self.optimizer.param_groups[0]["lr"]
        rate = self.args.batch_size * self.ctx.world_size / step_time
        eta = (total_steps - s.global_step) * step_time
        _logger.info(
            "epoch %d/%d  step %d/%d (%3.0f%%)  %.0f img/s  loss %.4f  ce %.4f  reg %.4f  lr %.4g  eta %s",
            epoch + 1,
            self.args.epochs,
            s.batch_in_epoch,
            self.updates_per_epoch,
            100.0 * s.batch_in_epoch / self.updates_per_epoch,
            rate,
            loss,
            ce,
            reg,
            lr,
            _format_eta(eta),
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
        with _StopFlag() as stop:
            while state.epoch < args.epochs:
                epoch = state.epoch
                epoch_start = time.perf_counter()
                steps_before = state.batch_in_epoch
                train_metrics = self.train_epoch(epoch, stop)
                if train_metrics is None:
                    return {}
                seconds = time.perf_counter() - epoch_start
                train_metrics["img_per_sec"] = (
                    (state.batch_in_epoch - steps_before)
                    * self.args.batch_size
                    * self.ctx.world_size
                    / seconds
                )
                self.sync_batchnorm_stats()
                # Every --val-interval epochs and at the last (timm's meaning).
                last_epoch = epoch + 1 == args.epochs
                metrics = self.validate() if last_epoch or (epoch + 1) % args.val_interval == 0 else {}
                lr = self.optimizer.param_groups[0]["lr"]
                state.epoch, state.batch_in_epoch = epoch + 1, 0
                state.epoch_sums, state.epoch_count = [0.0, 0.0, 0.0], 0
                is_best = bool(metrics) and (
                    state.best_metric is None or metrics["top1_err"] < state.best_metric
                )
                if is_best:
                    state.best_metric, state.best_epoch = metrics["top1_err"], epoch
                error = None
                if self.ctx.primary:
                    # The same columns every epoch (empty when not validated): the CSV header is the first row's.
                    prefixes = ("", "ema_") if self.task.has_ema() else ("",)
                    eval_row = (
                        {
                            k: metrics.get(k, "")
                            for prefix in prefixes
                            for k in (
                                f"{prefix}nll",
                                f"{prefix}top1_err",
                                f"{prefix}top5_err",
                                f"{prefix}ece",
                            )
                        }
                        if self.val_loader is not None
                        else {}
                    )
                    try:
                        update_summary(epoch, train_metrics, eval_row, self.out_dir / "summary.csv", lr=lr)
                    except OSError as e:
                        error = ckpt.CheckpointError(f"cannot write {self.out_dir / 'summary.csv'}: {e}")
                    if metrics:
                        _logger.info(
                            "epoch %d/%d validation: top-1 err %.2f%%  top-5 err %.2f%%  NLL %.4f  ECE %.2f%%  (%d images)",
                            epoch + 1,
                            args.epochs,
                            metrics["top1_err"],
                            metrics["top5_err"],
                            metrics["nll"],
                            metrics["ece"],
                            metrics["num_samples"],
                        )
                self.ctx.fail_together(error)
                # Commit the finished epoch to last.pth.tar (atomic), then copy it to best if it is.
                self.save()
                if is_best and self.ctx.primary:
                    try:
                        ckpt.copy_checkpoint(self.out_dir / ckpt.LAST, self.out_dir / ckpt.BEST)
                    except OSError as e:
                        error = ckpt.CheckpointError(f"cannot write {self.out_dir / ckpt.BEST}: {e}")
                self.ctx.fail_together(error)
                # A notice that came during validation or the save: stop now, not after more steps.
                if state.epoch < args.epochs and self._agree(stop, check_finite=False):
                    _logger.info(
                        "stop requested (SIGTERM): saved %s at the end of epoch %d, exiting",
                        ckpt.LAST,
                        epoch + 1,
                    )
                    return {}
        return metrics

    def close(self) -> None:
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
        ("ECE, 20 bins (%)", f"{metrics['ece']:.2f}"),
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
