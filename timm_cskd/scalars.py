"""The per-epoch scalars of summary.csv, also sent to Weights & Biases (``--log-wandb``, timm's flags:
``--wandb-project``, ``--wandb-tags``, ``--wandb-resume-id``; ``WANDB_MODE=offline`` works without a
network) and TensorBoard (``--log-tensorboard``, event files in the experiment folder). Both are optional
extras: ``pip install 'timm-cskd[wandb]'`` / ``'timm-cskd[tensorboard]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from timm_cskd.config import OutputConfig
from timm_cskd.errors import ConfigError

__all__ = ["ScalarLog"]

_logger = logging.getLogger(__name__)


class ScalarLog:
    def __init__(self, args: OutputConfig, out_dir: Path, record: dict):
        """The logs ``args`` asks for; ``record`` is the run's whole configuration (W&B's ``config``)."""
        self.wandb = self.tensorboard = None
        if args.log_wandb:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--log-wandb needs wandb: pip install 'timm-cskd[wandb]'") from e
            if args.wandb_resume_id and not args.resume:
                raise ConfigError(
                    "--wandb-resume-id continues a wandb run: resume the training with --resume too"
                )
            self.wandb = wandb.init(
                project=args.wandb_project,
                name=args.experiment,
                config=record,
                tags=list(args.wandb_tags or ()),  # YAML's null is not parsed into a list
                dir=str(out_dir),
                resume="must" if args.wandb_resume_id else None,
                id=args.wandb_resume_id or None,
            )
        if args.log_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(
                    "--log-tensorboard needs tensorboard: pip install 'timm-cskd[tensorboard]'"
                ) from e
            self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, epoch: int, train: dict, evaluated: dict, lr: float) -> None:
        """The epoch's scalars under summary.csv's column names (train_*, eval_*, lr)."""
        row = {f"train_{k}": v for k, v in train.items()}
        row.update({f"eval_{k}": v for k, v in evaluated.items()})
        row["lr"] = lr
        if self.wandb is not None:
            self.wandb.log({"epoch": epoch, **row}, step=epoch)
        if self.tensorboard is not None:
            for key, value in row.items():
                self.tensorboard.add_scalar(key, value, epoch)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
