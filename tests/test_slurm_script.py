"""examples/slurm_train.sh, the README's Slurm script, and examples/slurm_train_shards.sh (the same job
staging node-local shards first), run with stand-ins for srun, torchrun and scontrol.

The stand-in srun execs its command (after srun's own options) (the real one passes the signals it gets on to its tasks); the
stand-in torchrun takes 1 s to "checkpoint" after SIGTERM, as the trainer saves before it exits.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "slurm_train.sh"

FAKES = {
    "srun": 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',  # srun's own options, then the command
    "torchrun": """echo "started $*" >> "$LOG"
echo $$ > "$PIDFILE"
trap 'echo term >> "$LOG"; sleep 1; echo saved >> "$LOG"; exit 0' TERM
for _ in $(seq 300); do sleep 0.1; [ -e "$FINISH" ] && { echo finished >> "$LOG"; exit 0; }; done
exit 9
""",
    "scontrol": """case "$1" in
show) echo node1 ;;
requeue) kill -0 "$(cat "$PIDFILE")" 2>/dev/null && state=running || state=gone
         echo "requeue $2 torchrun $state" >> "$LOG" ;;
esac
""",
}


@pytest.fixture(params=["slurm_train.sh", "slurm_train_shards.sh"])
def job(tmp_path, request):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The shard job's staging step runs python: this interpreter, which imports timm_cskd.
    for name, body in {**FAKES, "python": f'exec "{sys.executable}" "$@"\n'}.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    shards = tmp_path / "shards"
    shards.mkdir()
    # 16 training shards for 2 nodes x 8 ranks: rank r owns shard r, so node 0 stages shards 0-7.
    listed = [{"tar": f"train-{k:06d}.tar", "index": f"train-{k:06d}.json", "dali_index": f"train-{k:06d}.idx"}
              for k in range(16)]  # fmt: skip
    (shards / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": listed}}}))
    for entry in listed:
        for name in entry.values():
            (shards / name).write_text(name)
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[1-2]",
        SLURM_NODEID="0", SHARDS=str(shards), LOCAL=str(tmp_path / "local"),
        LOG=str(tmp_path / "log"), PIDFILE=str(tmp_path / "pid"), FINISH=str(tmp_path / "finish"),
    )  # fmt: skip
    script = REPO / "examples" / request.param
    shell = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, start_new_session=True)
    try:
        yield shell, tmp_path
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)


def events(tmp_path):
    log = tmp_path / "log"
    return log.read_text().splitlines() if log.exists() else []


def wait_for_traps(shell, tmp_path, *signals):
    """Until torchrun runs and the shell catches ``signals`` (its SigCgt mask in /proc)."""
    wanted = sum(1 << (sig - 1) for sig in signals)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = Path(f"/proc/{shell.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught & wanted == wanted and events(tmp_path):
            return
        time.sleep(0.05)
    pytest.fail(f"the script never started torchrun catching {signals}")


def test_time_limit_checkpoints_first_then_requeues(job):
    shell, tmp_path = job
    wait_for_traps(shell, tmp_path, signal.SIGUSR1)
    shell.send_signal(signal.SIGUSR1)  # --signal=B:USR1@300: the batch shell alone
    shell.wait(timeout=30)
    assert events(tmp_path)[1:] == ["term", "saved", "requeue 77 torchrun gone"]
    assert events(tmp_path)[0].startswith("started --nnodes=2")


def test_preemption_waits_for_the_checkpoint_and_leaves_the_requeue_to_slurm(job):
    shell, tmp_path = job
    wait_for_traps(shell, tmp_path, signal.SIGTERM)
    # Slurm signals the step's processes and the batch shell.
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)
    shell.send_signal(signal.SIGTERM)
    assert shell.wait(timeout=30) == 0
    assert events(tmp_path)[1:] == ["term", "saved"], "the shell outlived the step, and did not requeue"


def test_a_finished_run_is_not_requeued(job):
    shell, tmp_path = job
    wait_for_traps(shell, tmp_path)
    (tmp_path / "finish").touch()
    assert shell.wait(timeout=30) == 0
    assert events(tmp_path)[1:] == ["finished"]
    if (tmp_path / "local").exists():  # the shard job: node 0 staged its 8 ranks' shards, no other
        staged = {p.name for p in (tmp_path / "local").iterdir()}
        assert staged == {"manifest.json"} | {
            f"train-{k:06d}.{x}" for k in range(8) for x in ("tar", "json", "idx")
        }


def test_the_readme_shows_this_script():
    readme = (REPO / "README.md").read_text()
    assert "```bash\n" + SCRIPT.read_text() + "```" in readme
