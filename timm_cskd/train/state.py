"""Where training stands (``TrainState``), the checkpoint that records it with every part's state, and
resume: choosing and reading the checkpoint on every rank, and restoring the parts from it, exactly
(the same position, RNG streams and schedule) or elastically on another rank count or batch size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from timm_cskd import checkpoint as ckpt
from timm_cskd.distributed import Context
from timm_cskd.experiment import seed_everything

__all__ = ["TrainState", "checkpoint_state", "load_resume_checkpoint", "restore"]

_logger = logging.getLogger("timm_cskd.train")


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
    # This epoch's loss columns (loss, ce, reg, the method's own terms) summed over all ranks' batches so
    # far, and how many rank-batches that is: a resumed epoch, on any number of ranks, reports its means whole.
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_count: int = 0


def checkpoint_state(parts, state: TrainState, rng_states: list[dict]) -> dict:
    """The checkpoint of ``parts`` (a ``Trainer``: its configuration and assembled parts) at ``state``,
    with every rank's RNG state."""
    config = parts.config
    saved = {
        "arch": config.model.model,
        # timm's convention: the last completed epoch, version 2 (timm resumes at epoch + 1).
        "epoch": state.epoch - 1,
        "version": 2,
        "args": config.to_dict(),
        "config_version": ckpt.CONFIG_VERSION,
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "metric": state.best_metric,  # timm's key: the best --eval-metric value so far
        "global_step": state.global_step,
        "resume_epoch": state.epoch,
        "resume_batch": state.batch_in_epoch,
        "best_epoch": state.best_epoch,
        "kept": state.kept,
        "epoch_sums": list(state.epoch_sums),
        "epoch_columns": list(parts.columns),
        "epoch_count": state.epoch_count,
        "sampler": parts.sampler.state_dict(batches_consumed=state.batch_in_epoch),
        "rng": rng_states,
        "num_classes": config.model.num_classes,
        "class_names": parts.train_index.classes,
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in parts.data_config.items()},
    }
    saved.update(parts.task.get_checkpoint_state())
    if parts.task.has_ema():
        saved.update(parts.task.get_checkpoint_state(ema=True))
    if parts.scaler is not None:
        saved["amp_scaler"] = parts.scaler.state_dict()
    return saved


def load_resume_checkpoint(ctx: Context, out_dir: Path, resume: str) -> tuple[Path, dict] | None:
    """Rank 0 chooses the checkpoint, every rank reads that file from its own view of the experiment
    folder, and all ranks fail together if one cannot: never one rank resuming while another starts."""
    found, error, state = None, None, None
    if resume == "auto":
        if ctx.primary:
            found = ckpt.find_resume_checkpoint(out_dir)
        name = ctx.broadcast(None if found is None else found[0].name)
        if name is None:
            _logger.info("--resume auto: no checkpoint in %s, starting fresh", out_dir)
            return None
        path = out_dir / name
    else:
        path = Path(resume)
    try:
        if found is not None:
            state = found[1]
            ckpt.config_version(state, path)  # a newer release's checkpoint refused, not skipped
        else:
            state = ckpt.load_checkpoint_file(path)
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


def restore(parts, path: Path, state: dict, columns: tuple[str, ...]) -> TrainState:
    """Load the checkpoint ``state`` (read from ``path``) into ``parts`` (a ``Trainer``'s assembled parts)
    and return the training state it records, with the epoch loss sums of ``columns``."""
    config, ctx = parts.config, parts.ctx
    optim = config.optim
    task, sampler, scheduler = parts.task, parts.sampler, parts.scheduler
    try:
        task.load_checkpoint_state(state["state_dict"], state.get("task_state"))
        if task.has_ema() and "state_dict_ema" in state:
            task.load_checkpoint_state(state["state_dict_ema"], state.get("task_state_ema"), ema=True)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path} does not fit --model {config.model.model}: {e}") from e
    if not config.output.no_resume_opt:
        parts.optimizer.load_state_dict(state["optimizer"])
    elastic = sampler.is_elastic(state["sampler"]) or len(state["rng"]) != ctx.world_size
    saved_epochs = state.get("args", {}).get("epochs", optim.epochs)
    if saved_epochs != optim.epochs:
        # timm's resume does the same: the schedule is created for the new length; the saved one
        # would keep the old length (a finished cosine run would train on at its final lr, often 0).
        _logger.info(
            "--epochs %d differs from the %d the checkpoint was trained for: the %s schedule is rebuilt "
            "for %d epochs and continues at epoch %d of it",
            optim.epochs,
            saved_epochs,
            optim.sched,
            optim.epochs,
            state["resume_epoch"] + 1,
        )
    # The scheduler counts updates: with another rank count or batch an epoch has another number of
    # them, so it is rebuilt for this run and placed at the same epoch position below.
    rebuilt = elastic or saved_epochs != optim.epochs
    if scheduler is not None and state.get("scheduler") is not None and not rebuilt:
        scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and "amp_scaler" in state and not config.output.no_resume_opt:
        parts.scaler.load_state_dict(state["amp_scaler"])
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as e:
        raise ckpt.CheckpointError(f"{path} cannot continue with these settings: {e}") from e
    epoch, batch = state["resume_epoch"], sampler.position
    # Sums by name: a checkpoint from before the method's own terms were logged has loss, ce, reg only,
    # and a teacher added on resume brings a kd column. Mid-epoch, a column the saved run did not sum
    # has no mean for this epoch (NaN, "nan" in summary.csv), not the mean of the batches since.
    saved_columns = state.get("epoch_columns", ("loss", "ce", "reg"))
    saved_sums = dict(zip(saved_columns, state["epoch_sums"]))
    epoch_count = state.get("epoch_count", state["resume_batch"])
    unknown = math.nan if epoch_count else 0.0
    sums = [saved_sums.get(name, unknown) for name in columns]
    restored = TrainState(
        epoch=epoch,
        batch_in_epoch=batch,
        global_step=epoch * parts.updates_per_epoch + -(-batch // optim.grad_accum_steps),
        best_metric=state["metric"],
        best_epoch=state["best_epoch"],
        kept=list(state.get("kept", [])),
        # Rank 0 carries the saved sums of the epoch; the others start theirs at zero.
        epoch_sums=sums if ctx.primary else [0.0] * len(columns),
        epoch_count=epoch_count if ctx.primary else 0,
    )
    if elastic:
        saved = state["sampler"]
        seed_everything(config.runtime.seed + ctx.rank + 1000 * restored.global_step)
        _logger.warning(
            "elastic resume: saved by %d rank(s) x batch %s, continuing on %d x %d from sample position %d "
            "of epoch %d (batch %d of %d); the rest of the epoch is re-sharded, augmentation and Mixup "
            "randomness is not replayed exactly",
            len(state["rng"]),
            saved.get("batch_size"),
            ctx.world_size,
            config.data.batch_size,
            sampler.state_dict()["units_consumed"],
            epoch + 1,
            batch,
            parts.updates_per_epoch,
        )
    else:
        ckpt.set_rng_state(state["rng"][ctx.rank])
    if scheduler is not None:  # the learning rate where the run stopped (timm's resume does this)
        if optim.sched_on_updates:
            scheduler.step_update(restored.global_step)
        else:
            scheduler.step(restored.epoch)
    _logger.info(
        "resumed from %s at epoch %d, batch %d (step %d)",
        path,
        restored.epoch,
        restored.batch_in_epoch,
        restored.global_step,
    )
    return restored
