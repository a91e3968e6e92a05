"""Process group and device set-up from torchrun's (or SLURM's) environment, via timm."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so
from torch.distributed.rendezvous import register_rendezvous_handler, rendezvous

__all__ = ["Context", "setup_context"]

_logger = logging.getLogger(__name__)

# How long ranks wait for rank 0's one-off work (scanning a dataset on network storage can take many
# minutes); the training process group keeps NCCL's default, so a hung step is still caught quickly.
SLOW_WORK_TIMEOUT = timedelta(hours=3)


_ATTEMPT_SCHEME = "timm-cskd-attempt"


def _attempt_rendezvous(url, timeout=dist.default_pg_timeout, **kwargs):
    """``env://`` with store keys private to this torchrun attempt.

    torchrun keeps one store for every restart of its workers, so a restarted rank can read the
    process-group address of a rank that died with the previous attempt and fail to connect (gloo:
    "connectFullMesh failed ... Connection refused"; NCCL: a stale unique id). On one node every
    worker shares the agent's restart count, which keeps the attempts apart (restarts for nodes
    joining an elastic ``--nnodes=1:N`` job do not count, so there two rounds may share a name).
    """
    store, rank, world_size = next(rendezvous("env://", timeout=timeout))
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    private = dist.PrefixStore(f"timm_cskd/attempt_{attempt}", store)
    if attempt > 0:
        # NCCL's watchdog flags a failure in the bare store, beyond any prefix; left there, it makes
        # the restarted group's heartbeat monitor abort every rank after TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC.
        if rank == 0:
            store.delete_key(_NCCL_DUMP_FLAG)
            private.set("stale_keys_cleared", "1")
        else:
            private.wait(["stale_keys_cleared"])
    yield private, rank, world_size


_NCCL_DUMP_FLAG = "exception_dump"
register_rendezvous_handler(_ATTEMPT_SCHEME, _attempt_rendezvous)


def _init_url() -> str:
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return "env://"
    if os.environ.get("GROUP_WORLD_SIZE") == "1":
        return f"{_ATTEMPT_SCHEME}://"
    # Agents on several nodes count restarts each on their own (a healthy node re-joins without
    # counting), so the count cannot name an attempt; a store per rendezvous round can.
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
    ):
        _logger.warning(
            "torchrun --max-restarts on several nodes shares one store across restarts, so a "
            "restarted group can read a dead rank's address and fail to connect; launch with "
            "--rdzv-backend=c10d and export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for a fresh store "
            "each round (the default static backend always shares it)"
        )
    return "env://"


@dataclass
class Context:
    """What every rank knows about the process group and device."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    # A gloo group with a long timeout, for waiting on rank 0's one-off work.
    slow_group: object = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def fail_together(self, error: Exception | None, slow: bool = False) -> None:
        """Raise on every rank if any rank failed, so no rank waits forever in its next collective.

        Each rank passes the exception it caught (or None); all ranks raise the first failing rank's
        error with that rank and its host named. Single process: re-raises ``error``. ``slow`` waits on
        the long-timeout group, after rank-0 work that may take many minutes.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        reports = [None] * self.world_size
        mine = None if error is None else (error, socket.gethostname())
        dist.all_gather_object(reports, mine, group=self.slow_group if slow else None)
        for rank, report in enumerate(reports):
            if report is not None:
                failure, host = report
                raise type(failure)(f"rank {rank} on {host}: {failure}") from (
                    error if rank == self.rank else None
                )

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def setup_context(args) -> Context:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed_device_so(device=device, dist_url=_init_url())
    ctx = Context(
        device=torch.device(info["device"]),
        world_size=info["world_size"],
        rank=info["global_rank"],
        local_rank=info["local_rank"],
    )
    if ctx.distributed:
        ctx.slow_group = dist.new_group(backend="gloo", timeout=SLOW_WORK_TIMEOUT)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ctx
