"""The training job behind ``train_imagenet.py``: DDP from torchrun's environment, torch AMP, each method
as a timm TrainingTask, timm's optimizer/scheduler/EMA, exact mid-epoch resume and SIGTERM checkpoints.

``run(config)`` trains a ``RunConfig`` (or the parsed command line, converted to one where the trainer
starts) and returns the final validation metrics; ``main(argv)`` is the command line and
``cli(argv)`` the command users run (``timm-cskd train``, ``python -m timm_cskd.train``), the demo by default.

The package: ``assemble`` (the composition root: every part built from the configuration), ``state``
(the training position, its checkpoint and resume), ``loop`` (``Trainer``, the epoch loop), ``guards``
(stop and non-finite agreement across ranks) and ``records`` (summary.csv, status.json, the best and kept
checkpoints, the final table).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from timm_cskd import checkpoint as ckpt
from timm_cskd.config import DEMO_CONFIG, RunConfig, parse_args
from timm_cskd.data.index import DataIndexError
from timm_cskd.errors import ConfigError
from timm_cskd.methods import describe_methods
from timm_cskd.run_lock import RunLockedError
from timm_cskd.train.guards import TrainingDivergedError
from timm_cskd.train.loop import Trainer
from timm_cskd.train.records import print_final_table
from timm_cskd.train.state import TrainState

__all__ = ["TrainState", "Trainer", "TrainingDivergedError", "cli", "fit", "main", "print_final_table", "run"]


def fit(config: RunConfig | argparse.Namespace) -> tuple[dict[str, float], Path]:
    """Train ``config``; the final validation metrics (rank 0 also prints them as a table) and the
    experiment folder."""
    trainer = Trainer(config)
    try:
        metrics = trainer.fit()
    finally:
        trainer.close()
    if trainer.ctx.primary and metrics:
        print_final_table(trainer, metrics)
    return metrics, trainer.out_dir


def run(config: RunConfig | argparse.Namespace) -> dict[str, float]:
    """Train ``config``; the final validation metrics (rank 0 also prints them as a table)."""
    return fit(config)[0]


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
