"""Which launches form a process group: torchrun, srun with one task per process, and nothing else.

Slurm is simulated with its environment variables; an srun step of two tasks is two subprocesses on
this machine (gloo, CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PLAIN_RECIPE, make_tiny_dataset
from test_ddp import free_port

from timm_cskd import evaluate, train
from timm_cskd.config import ConfigError
from timm_cskd.distributed import Launch, detect_launch, select_device

HERE = Path(__file__).resolve().parent

# What an sbatch script with --ntasks=2 (its batch step) or an salloc shell has: the allocation's
# task count, but no srun step.
ALLOCATION = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
LAUNCH_VARS = ["WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID",
               "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RESTART_COUNT"]  # fmt: skip


def srun_task(rank, tasks=2, **extra):
    """The variables srun gives task ``rank`` of a one-node step of ``tasks`` tasks."""
    env = dict(ALLOCATION, SLURM_NTASKS=str(tasks), SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(tasks))
    return {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), **extra}


@pytest.mark.parametrize(
    "env",
    [
        {},
        ALLOCATION,
        dict(ALLOCATION, SLURM_STEP_ID="4294967294", SLURM_STEP_NUM_TASKS="2"),  # the batch step's id
        dict(ALLOCATION, MASTER_ADDR="node1", MASTER_PORT="29500"),  # exported for a later srun
        srun_task(0, tasks=1),  # srun --ntasks=1 python ...
        dict(srun_task(1), WORLD_SIZE="1", RANK="0"),  # srun torchrun --nproc_per_node=1, one node
    ],
    ids=[
        "no-launcher",
        "allocation",
        "batch-step",
        "allocation-with-master",
        "srun-one-task",
        "torchrun-one",
    ],
)
def test_one_process_unless_a_launcher_started_several(env):
    assert detect_launch(env) == Launch()


def test_srun_tasks_form_the_group_from_slurm_variables():
    env = srun_task(1, tasks=4, SLURM_LOCALID="0", MASTER_ADDR="node1", MASTER_PORT="29500")
    assert detect_launch(env) == Launch(world_size=4, rank=1, local_rank=0, launcher="srun")


def test_torchrun_under_srun_takes_torchruns_ranks():
    env = dict(srun_task(1), WORLD_SIZE="16", RANK="11", LOCAL_RANK="3")
    assert detect_launch(env) == Launch(world_size=16, rank=11, local_rank=3, launcher="torchrun")


def test_srun_tasks_without_master_address_say_what_to_export():
    with pytest.raises(ConfigError, match="2 tasks .* MASTER_ADDR and MASTER_PORT"):
        detect_launch(srun_task(0))


@pytest.mark.parametrize(
    ("visible", "local_rank", "expected"),
    [(1, 3, "cuda:0"), (8, 3, "cuda:3"), (8, 0, "cuda:0")],
    ids=["gpus-per-task-1", "node-visible", "node-visible-rank0"],
)
def test_each_rank_takes_its_gpu(monkeypatch, visible, local_rank, expected):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    device = select_device(
        None, Launch(world_size=8, rank=local_rank, local_rank=local_rank, launcher="srun")
    )
    assert device == torch.device(expected)
    assert chosen == [device]


def test_more_ranks_than_visible_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="local rank 2 .* sees 2 cuda devices"):
        select_device("cuda", Launch(world_size=4, rank=2, local_rank=2, launcher="torchrun"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def tiny_args(data_dir, out, *extra):
    return [
        "--data-dir", str(data_dir), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", "1", "-b", "8", "--lr", "0.05", *PLAIN_RECIPE, "-j", "0", "--output", str(out),
        "--experiment", "run", "--seed", "1", *extra,
    ]  # fmt: skip


def test_plain_python_inside_an_allocation_trains_and_evaluates_as_one_process(
    data_dir, tmp_path, monkeypatch
):
    """Before, timm took SLURM_NTASKS=2 for rank 0 of 2: "MASTER_ADDR expected, but not set"."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in ALLOCATION.items():
        monkeypatch.setenv(var, value)
    assert train.main(tiny_args(data_dir, tmp_path)) == 0
    assert len((tmp_path / "run" / "summary.csv").read_text().splitlines()) == 2
    checkpoint = str(tmp_path / "run" / "last.pth.tar")
    out = tmp_path / "eval"
    assert (
        evaluate.main(
            ["--checkpoint", checkpoint, "--data-dir", str(data_dir), "-j", "0", "--output", str(out)]
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 20


def srun_step(script, args, extra_env=None, timeout=120):
    """Two tasks of one srun step on this node, as srun starts them: same command, own SLURM_PROCID."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        env.update(srun_task(rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), OMP_NUM_THREADS="1")
        env.update(extra_env or {}, PYTHONPATH=str(HERE.parent))
        procs.append(
            subprocess.Popen([sys.executable, str(script), *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )  # fmt: skip
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs], [proc.returncode for proc in procs]
    finally:
        for proc in procs:
            proc.kill()


@pytest.mark.slow
def test_ranks_wait_for_rank_0s_slow_work_without_a_second_process_group():
    """Rank 0 works longer than the group's timeout; rank 1 waits for it through the rendezvous store
    and both raise rank 0's error. Before, a gloo side group was created for this: across nodes it
    binds to gethostname()'s address and can hang for its 3-hour timeout."""
    outputs, codes = srun_step(HERE / "launch_worker.py", [], {"GROUP_TIMEOUT_S": "4", "PRIMARY_WORK_S": "8"})
    for rank, (output, code) in enumerate(zip(outputs, codes)):
        assert code == 0, output
        assert f"rank {rank} of 2" in output
        assert "raised: rank 0 on " in output and "index unreadable" in output


@pytest.mark.slow
def test_srun_one_task_per_process_trains_as_one_group(data_dir, tmp_path):
    outputs, codes = srun_step(HERE / "ddp_worker.py", tiny_args(data_dir, tmp_path, "--log-interval", "1"))
    assert codes == [0, 0], "\n".join(outputs)
    run_dir = tmp_path / "run"
    w0, w1 = (torch.load(run_dir / f"rank{r}.pt") for r in (0, 1))
    for key in w0:
        assert torch.equal(w0[key], w1[key]), (
            f"{key} differs between the tasks: they did not train as one group"
        )
    metrics = [json.loads((run_dir / f"metrics{r}.json").read_text()) for r in (0, 1)]
    assert metrics[0] == metrics[1] and metrics[0]["num_samples"] == 20, "each validation image counted once"


def test_a_wait_key_left_by_a_dead_group_does_not_release_the_next_groups_ranks(monkeypatch):
    # A restarted group sharing torchrun's store: rank 0 of the dead group set its "done" key and died
    # before deleting it. The new group's rank 1 must still wait for the new rank 0, not run ahead.
    import datetime

    import torch.distributed as dist

    from timm_cskd import distributed

    store = dist.HashStore()
    for stale_group in ("", "previous-group"):
        store.set(f"timm_cskd/primary_done/{stale_group}/0", "1")
        store.set("timm_cskd/primary_done/0", "1")
    monkeypatch.setattr(distributed, "SLOW_WORK_TIMEOUT", datetime.timedelta(seconds=0.2))
    ctx = distributed.Context(torch.device("cpu"), world_size=2, rank=1, store=store, group_id="new-group")
    with pytest.raises(dist.DistStoreError, match="(?i)timeout|wait"):
        ctx.fail_together(None, slow=True)
