"""Run by test_launch as two srun-like tasks: set up the group, then wait out rank 0's slow work.

The default group's timeout is cut to ``GROUP_TIMEOUT_S`` and rank 0 works for ``PRIMARY_WORK_S``,
longer than that: the other rank must wait for it without timing out. A second process group is
refused, as a gloo group that cannot connect between nodes would be. Rank 0's work fails with
``OSError('index unreadable')``; each rank prints what it raised.
"""

import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from timm_cskd.distributed import setup_context


def refuse_new_group(*args, **kwargs):
    raise RuntimeError("a second process group was created")


if __name__ == "__main__":
    init = dist.init_process_group
    timeout = timedelta(seconds=float(os.environ["GROUP_TIMEOUT_S"]))
    dist.init_process_group = lambda *args, **kwargs: init(*args, **dict(kwargs, timeout=timeout))
    dist.new_group = refuse_new_group

    class Args:
        device = "cpu"

    ctx = setup_context(Args())
    print(f"rank {ctx.rank} of {ctx.world_size}", flush=True)
    error = None
    if ctx.primary:
        time.sleep(float(os.environ["PRIMARY_WORK_S"]))
        error = OSError("index unreadable")
    try:
        ctx.fail_together(error, slow=True)
    except OSError as e:
        print(f"raised: {e}", flush=True)
        dist.destroy_process_group()
        sys.exit(0)
    sys.exit(1)
