"""Run under torchrun by the DDP tests: train, then save this rank's weights and validation metrics.

Test-only faults and probes, from the environment:
- ``RECORD_DIR``: append each trained batch's (epoch, dataset indices) to ``RECORD_DIR/rank{R}.jsonl``.
- ``STOP_AT_STEP``: every rank sends itself SIGTERM at that global step (a scheduler's preemption).
- ``CRASH_AT_STEP``: rank 1 of the first torchrun attempt dies by SIGKILL at that step, leaving in
  torchrun's store the failure flag NCCL's watchdog writes there; a restarted rank exits 3 if the flag
  survived into its attempt (its NCCL heartbeat monitor would abort on it).
- ``PER_RANK_OUTPUT``: each rank writes under ``--output``/node{R}, as nodes without shared storage do.
- ``PER_RANK_DATA``: each rank reads ``--data-dir``/node{R}, its node's local disk.
- ``STEP_SECONDS``: every step takes at least that long (a large model's step), so a signal sent after
  the first checkpoint lands mid-run however fast this machine is.
- ``SLOW_RESTART``: on a torchrun restart, rank 1 starts that many seconds after rank 0 (a slow import
  or file system), so rank 0 reads the store before rank 1 has written its new address to it.
"""

import collections
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from timm.utils.model import unwrap_model

from timm_cskd.config import parse_args
from timm_cskd.sampler import _PlanBatchSampler
from timm_cskd.train import Trainer

NCCL_DUMP_FLAG = "exception_dump"


def agent_store():
    return torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
    )


def instrument():
    rank = int(os.environ.get("RANK", 0))
    pending = collections.deque()
    record_dir = os.environ.get("RECORD_DIR")
    stop_at = int(os.environ.get("STOP_AT_STEP", 0))
    crash_at = int(os.environ.get("CRASH_AT_STEP", 0))
    step_seconds = float(os.environ.get("STEP_SECONDS", 0))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    plan_iter = _PlanBatchSampler.__iter__

    def recording_iter(self):
        for batch in plan_iter(self):
            pending.append((self.epoch, batch))
            yield batch

    train_step = Trainer._train_step

    def step(self, images, target, *accumulation):
        epoch, batch = pending.popleft()
        if record_dir:
            with open(Path(record_dir) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps([epoch, batch]) + "\n")
        result = train_step(self, images, target, *accumulation)
        time.sleep(step_seconds)
        if self.state.global_step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if first_attempt and rank == 1 and self.state.global_step + 1 == crash_at:
            agent_store().set(NCCL_DUMP_FLAG, "1")
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    _PlanBatchSampler.__iter__ = recording_iter
    Trainer._train_step = step


if __name__ == "__main__":
    instrument()
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ["RANK"] == "1":
        time.sleep(float(os.environ.get("SLOW_RESTART", 0)))
    args = parse_args(sys.argv[1:])
    if os.environ.get("PER_RANK_DATA"):
        args.data_dir = str(Path(args.data_dir) / f"node{os.environ['RANK']}")
    if os.environ.get("PER_RANK_OUTPUT"):
        args.output = str(Path(args.output) / f"node{os.environ['RANK']}")
    trainer = Trainer(args)
    metrics = trainer.fit()
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if restarted and os.environ.get("CRASH_AT_STEP") and agent_store().check([NCCL_DUMP_FLAG]):
        sys.exit(3)
    rank = trainer.ctx.rank
    out = Path(args.output) / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap_model(trainer.task.trainable_module).state_dict(), out / f"rank{rank}.pt")
    if trainer.task.has_ema():
        torch.save(trainer.task.get_trainable_module(ema=True).state_dict(), out / f"ema{rank}.pt")
    (out / f"metrics{rank}.json").write_text(json.dumps(metrics))
    trainer.close()
