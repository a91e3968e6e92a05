"""Process group and device set-up from torchrun's (or SLURM's) environment, via timm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so

__all__ = ["Context", "setup_context"]


@dataclass
class Context:
    """What every rank knows about the process group and device."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_context(args) -> Context:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed_device_so(device=device)
    ctx = Context(
        device=torch.device(info["device"]),
        world_size=info["world_size"],
        rank=info["global_rank"],
        local_rank=info["local_rank"],
    )
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ctx
