"""Process group and device set-up for the launches this project supports.

- torchrun, alone or under ``srun torchrun``: torchrun's WORLD_SIZE, RANK and LOCAL_RANK.
- ``srun python ...``, one task per process: a task of an srun step that has several tasks, with
  MASTER_ADDR and MASTER_PORT exported by the job script (Slurm sets neither).
- anything else is one process, also a plain ``python`` inside an sbatch script or an salloc shell,
  where Slurm sets SLURM_NTASKS and SLURM_PROCID for the allocation but no srun step runs.

timm's ``init_distributed_device_so`` is not used: it takes SLURM_NTASKS > 1 for a launch (so a plain
``python`` in an allocation waits for ranks that never come) and picks ``cuda:$SLURM_LOCALID`` even
where each task sees one GPU.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import register_rendezvous_handler, rendezvous

from timm_cskd.config import RuntimeConfig
from timm_cskd.errors import ConfigError

__all__ = ["Context", "Launch", "detect_launch", "select_device", "setup_context"]

_logger = logging.getLogger(__name__)

# How long ranks wait for rank 0's one-off work (scanning a dataset on network storage can take many
# minutes); the training process group keeps its backend's default, so a hung step is still caught quickly.
SLOW_WORK_TIMEOUT = timedelta(hours=3)

# Slurm numbers srun's steps from 0; the batch script, an salloc's interactive step and the extern
# step have ids above this (slurm.h's SLURM_MAX_NORMAL_STEP_ID).
_MAX_NORMAL_STEP_ID = 0xFFFFFFF0

# timm's table (init_distributed_device_so): the collective backend of each device type.
_BACKENDS = {"cuda": "nccl", "xpu": "ccl", "hpu": "hccl", "npu": "hccl"}


@dataclass(frozen=True)
class Launch:
    """How this process was started: its place in the job, and by whom (``single``, ``torchrun``, ``srun``)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    launcher: str = "single"


def _srun_step_tasks(env) -> int:
    """The task count of the srun step this process is a task of; 1 outside an srun step."""
    step = env.get("SLURM_STEP_ID", "")
    if not step.isdigit() or int(step) > _MAX_NORMAL_STEP_ID or "SLURM_PROCID" not in env:
        return 1
    return int(env.get("SLURM_STEP_NUM_TASKS", 1))


def detect_launch(env=os.environ) -> Launch:
    """Read the launch from the environment; a partial one fails with what to set."""
    if "WORLD_SIZE" in env:
        world_size = int(env["WORLD_SIZE"])
        if world_size <= 1:
            return Launch()
        if "RANK" not in env:
            raise ConfigError(f"WORLD_SIZE={world_size} but RANK is not set: launch with torchrun")
        return Launch(world_size, int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    tasks = _srun_step_tasks(env)
    if tasks <= 1:
        return Launch()
    missing = [var for var in ("MASTER_ADDR", "MASTER_PORT") if not env.get(var)]
    if missing:
        raise ConfigError(
            f"srun started this step with {tasks} tasks (SLURM_STEP_NUM_TASKS) but {' and '.join(missing)} "
            "not set: for one task per GPU export MASTER_ADDR (the first node) and MASTER_PORT in the job "
            "script, or start one task per node running torchrun (see the README)"
        )
    return Launch(tasks, int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), "srun")


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


def _init_url(launch: Launch) -> str:
    if launch.launcher == "srun":
        return f"env://?rank={launch.rank}&world_size={launch.world_size}"
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


def select_device(requested: str | None, launch: Launch) -> torch.device:
    """``--device`` (default: CUDA where available, else the CPU), the launch's local device."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on {socket.gethostname()}")
    accelerator = getattr(torch, device.type, None)
    if launch.world_size > 1 and device.type != "cpu" and hasattr(accelerator, "device_count"):
        count = accelerator.device_count()
        # One device visible per task (srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES to it) is
        # device 0 whatever the local rank; with the node's devices all visible, the local rank's.
        index = 0 if count == 1 else launch.local_rank
        if index >= count:
            raise ConfigError(
                f"local rank {launch.local_rank} on {socket.gethostname()} sees {count} {device.type} "
                "devices: start at most one process per device, or give each task one (--gpus-per-task=1)"
            )
        if device.index is not None and device.index != index:
            _logger.warning("--device %s: rank %d uses %s:%d", requested, launch.rank, device.type, index)
        device = torch.device(device.type, index)
    if device.index is not None and hasattr(accelerator, "set_device"):
        accelerator.set_device(device)
    return device


@dataclass
class Context:
    """What every rank knows about the process group and device."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    # The rendezvous store every rank reached to form the group: waiting on rank 0's one-off work
    # through it needs no second process group (gloo's, across nodes, binds to whatever address
    # gethostname() resolves to, often one other nodes cannot reach).
    store: dist.Store | None = field(default=None, repr=False)
    _waits: itertools.count = field(default_factory=itertools.count, repr=False)
    # Names this group's wait keys: a restarted group sharing the store must not find a key that a
    # rank 0 which died between setting and deleting it left behind.
    group_id: str = field(default="", repr=False)

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
        error with that rank and its host named. Single process: re-raises ``error``. ``slow``: after
        rank-0 work that may take many minutes, the other ranks wait for it (up to SLOW_WORK_TIMEOUT).
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        key = f"timm_cskd/primary_done/{self.group_id}/{next(self._waits)}" if slow else None
        if key is not None:
            if self.primary:
                self.store.set(key, "1")
            else:
                self.store.wait([key], SLOW_WORK_TIMEOUT)
        reports = [None] * self.world_size
        mine = None if error is None else (error, socket.gethostname())
        dist.all_gather_object(reports, mine)
        if key is not None and self.primary:
            # Every rank has passed the wait; a restarted group sharing the store must not find it.
            self.store.delete_key(key)
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


def setup_context(runtime: RuntimeConfig) -> Context:
    """This rank's place in the launch and its device (``runtime.device``), the process group joined."""
    launch = detect_launch()
    device = select_device(runtime.device, launch)
    ctx = Context(device, launch.world_size, launch.rank, launch.local_rank)
    if ctx.distributed:
        store, rank, world_size = next(rendezvous(_init_url(launch), timeout=dist.default_pg_timeout))
        dist.init_process_group(
            _BACKENDS.get(device.type, "gloo"),
            store=dist.PrefixStore("default_pg", store),  # as init_process_group keys its own
            rank=rank,
            world_size=world_size,
        )
        ctx.store = store
        group_id = [uuid.uuid4().hex if ctx.primary else None]
        dist.broadcast_object_list(group_id, src=0)
        ctx.group_id = group_id[0]
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ctx
