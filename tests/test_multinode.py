"""Two nodes, simulated on this machine: two torchrun agents joined by a c10d rendezvous (gloo, CPU).

Each agent runs one worker, as each node of ``torchrun --nnodes=2`` would; the agents are started in
their own sessions, as srun starts a task, so a signal to one agent's process group is what Slurm
sends that node's torchrun.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PLAIN_RECIPE, make_tiny_dataset
from test_ddp import free_port

HERE = Path(__file__).resolve().parent
# Every wait is bounded: a hang fails the test instead of blocking CI.
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("nodes"))


def worker_args(data_dir, out, epochs, *extra):
    # 48 training images, 4 per rank per step: 6 steps an epoch.
    return [
        "--data-dir", str(data_dir), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", str(epochs), "-b", "4", "--lr", "0.05", *PLAIN_RECIPE, "-j", "0", "--output", str(out),
        "--experiment", "run", "--log-interval", "1", "--checkpoint-interval", "2", "--seed", "3",
        "--resume", "auto", *extra,
    ]  # fmt: skip


class Nodes:
    """Two torchrun agents on this machine, as two nodes; their output in ``log_dir/node{N}.log``."""

    def __init__(self, log_dir, args, max_restarts=0, share_store=False):
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent), PYTHONUNBUFFERED="1")
        env["STEP_SECONDS"] = "0.3"  # the signals below land mid-run on any machine
        if not share_store:
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        self.logs = [Path(log_dir) / f"node{n}.log" for n in range(2)]
        self.agents = []
        for log in self.logs:
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nodes",
                f"--max-restarts={max_restarts}", "--monitor-interval=0.5", str(HERE / "ddp_worker.py"), *args,
            ]  # fmt: skip
            with open(log, "w") as f:
                self.agents.append(
                    subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                )
        self.deadline = time.monotonic() + TIMEOUT_S

    def output(self):
        return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in self.logs)

    def wait_until(self, condition, what):
        while not condition():
            assert time.monotonic() < self.deadline, f"timed out waiting for {what}\n{self.output()}"
            assert all(agent.poll() is None for agent in self.agents), (
                f"an agent ended before {what}\n{self.output()}"
            )
            time.sleep(0.2)

    def worker(self, node):
        """The pid of node ``node``'s worker: its agent's child."""
        (pid,) = children(self.agents[node].pid)
        return pid

    def finish(self):
        """Wait for both agents to end; their exit codes."""
        try:
            return [agent.wait(timeout=max(self.deadline - time.monotonic(), 1)) for agent in self.agents]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agents did not end in {TIMEOUT_S} s\n{self.output()}")

    def kill(self):
        """Leftovers of a failed test: each agent's group and its workers' (torchrun starts each
        worker in a session of its own)."""
        for agent in self.agents:
            if agent.poll() is None:
                for group in [*children(agent.pid), agent.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(group, signal.SIGKILL)
                agent.wait(timeout=10)


def children(pid):
    """The pids of ``pid``'s child processes."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture
def nodes():
    started = []

    def start(*args, **kwargs):
        started.append(Nodes(*args, **kwargs))
        return started[-1]

    yield start
    for group in started:
        group.kill()


def epochs_logged(out):
    lines = (out / "run" / "summary.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


def status(out):
    return json.loads((out / "run" / "status.json").read_text())


@pytest.mark.slow
def test_two_nodes_train_and_a_killed_worker_restarts_the_group_from_the_last_checkpoint(
    data_dir, tmp_path, nodes
):
    out = tmp_path / "out"
    group = nodes(tmp_path, worker_args(data_dir, out, epochs=2), max_restarts=1)
    group.wait_until(lambda: (out / "run" / "last.pth.tar").exists(), "the first checkpoint")
    os.kill(group.worker(1), signal.SIGKILL)  # node 1's worker, as the OOM killer would
    assert group.finish() == [0, 0], group.output()
    output = group.output()
    assert "no checkpoint in" in output, "the first attempt starts fresh"
    assert "resumed from " in output, "the restarted group continues from the checkpoint"
    assert epochs_logged(out) == [0, 1] and status(out)["finished"]
    w0, w1 = (torch.load(out / "run" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the nodes' weights differ"
    assert json.loads((out / "run" / "metrics0.json").read_text())["num_samples"] == 20


@pytest.mark.slow
def test_sigterm_to_both_nodes_checkpoints_then_resume_finishes(data_dir, tmp_path, nodes):
    out = tmp_path / "out"
    args = worker_args(data_dir, out, epochs=2)
    group = nodes(tmp_path, args)
    group.wait_until(lambda: (out / "run" / "last.pth.tar").exists(), "the first checkpoint")
    for agent in group.agents:  # Slurm's time limit or scancel: every node's torchrun
        os.killpg(agent.pid, signal.SIGTERM)
    group.finish()  # torchrun re-raises the signal (exit 1) after its workers ended: not asserted
    output = group.output()
    assert "stop requested (SIGTERM): saved last.pth.tar" in output, output
    # ddp_worker writes these only after the trainer returned: both workers stopped cleanly.
    assert all((out / "run" / f"metrics{r}.json").exists() for r in (0, 1)), output
    assert not (out / "run" / "summary.csv").exists(), "stopped within the first epoch"
    again = tmp_path / "again"
    again.mkdir()
    resumed = nodes(again, args)
    assert resumed.finish() == [0, 0], resumed.output()
    assert "resumed from " in resumed.output()
    assert epochs_logged(out) == [0, 1] and status(out)["finished"]
