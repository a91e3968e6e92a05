"""Run under torchrun by test_ddp.py: train, then save this rank's weights and validation metrics."""

import json
import sys
from pathlib import Path

import torch
from timm.utils.model import unwrap_model

from timm_cskd.config import parse_args
from timm_cskd.train import Trainer

if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    trainer = Trainer(args)
    metrics = trainer.fit()
    rank = trainer.ctx.rank
    out = Path(args.output) / args.experiment
    torch.save(unwrap_model(trainer.task.trainable_module).state_dict(), out / f"rank{rank}.pt")
    (out / f"metrics{rank}.json").write_text(json.dumps(metrics))
    trainer.close()
