"""Rows that run the real trainer (``train_imagenet.py`` / ``timm_cskd.train.Trainer``) end to end on a
generated ImageFolder: --amp --amp-dtype float16 --channels-last --model-ema, the torch backend with
loader workers, CS-KD's anchor layout (each step loads as many partners as anchors)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .checks import free_port
from .common import REPO, Env, Row, check
from .dataset import PHOTO_SIZES, make_image_folder
from .syncs import SyncCounter, instrument

WARMUP_STEPS = 2  # cuDNN autotuning and the allocator's first growth happen here


def dataset(env: Env) -> Path:
    a = env.args
    root = env.work_dir / "data"
    if not (root / "val").exists():
        sizes = [(40, 32)] if a.smoke else PHOTO_SIZES
        make_image_folder(root, a.trainer_classes, a.trainer_images_per_class, 4, sizes)
    return root


def steps_per_epoch(env: Env, world_size: int = 1) -> int:
    a = env.args
    return a.trainer_classes * a.trainer_images_per_class // (a.trainer_batch * world_size)


def trainer_argv(env: Env, experiment: str, *extra: str) -> list[str]:
    a = env.args
    return [
        "--data-dir", str(dataset(env)), "--model", a.model, "--img-size", str(a.img_size),
        "--device", env.device.type, "-b", str(a.trainer_batch), "--epochs", "1", "--method", "cskd",
        "--amp", "--amp-dtype", "float16", "--channels-last", "--model-ema", "--data-backend", "torch",
        "-j", str(a.workers), "--opt", "momentum", "--lr", "0.05", "--warmup-epochs", "0",
        "--log-interval", str(a.log_interval), "--seed", "0",
        "--output", str(env.work_dir / "runs"), "--experiment", experiment, *extra,
    ]  # fmt: skip


def child_env(**extra: str) -> dict:
    """A child process imports this checkout (not pip-installed on the GPU machine) and this package."""
    path = [str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), PYTHONUNBUFFERED="1", **extra)


class Child:
    """A process in its own process group (as a batch scheduler starts a job), output to a log file."""

    def __init__(self, env: Env, name: str, cmd: list[str], **extra_env: str):
        self.env, self.name = env, name
        self.log = env.work_dir / f"{name}.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=child_env(**extra_env), stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def group_gone(self, timeout: float = 10.0) -> bool:
        """No process of the group is left (the loader workers exited with the trainer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def output(self) -> str:
        text = self.log.read_text(errors="replace")
        self.env.logs.append(
            f"===== {self.name} (exit {self.proc.returncode})\n" + "\n".join(text.splitlines()[-40:])
        )
        return text


def train_cli(env: Env, name: str, argv: list[str]) -> Child:
    return Child(env, name, [sys.executable, str(REPO / "train_imagenet.py"), *argv])


def wait_for_file(path: Path, child: Child, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _status(folder: Path) -> dict:
    try:
        return json.loads((folder / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _epoch_rows(folder: Path) -> list[dict]:
    try:
        with open(folder / "summary.csv") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def row_sigterm_resume(env: Env) -> Row:
    """SIGTERM to the trainer's process group mid-epoch leaves a checkpoint and exit 0; --resume auto
    continues from it and finishes the run."""
    from timm_cskd.checkpoint import load_checkpoint_file

    name, total = "trainer SIGTERM + resume", steps_per_epoch(env)
    interval = max(2, total // 8)
    argv = trainer_argv(env, "sigterm", "--checkpoint-interval", str(interval))
    folder = env.work_dir / "runs" / "sigterm"
    first = train_cli(env, "sigterm-run", argv)
    if not wait_for_file(folder / "last.pth.tar", first, env.left()):
        first.kill()
        last_line = (first.output().strip().splitlines() or [""])[-1]
        return check(name, False, "no checkpoint appeared", f"exit {first.proc.returncode}: {last_line}")
    os.killpg(first.proc.pid, signal.SIGTERM)
    rc = first.wait(min(120.0, env.left()))
    gone = first.group_gone()
    stopped = "stop requested (SIGTERM)" in first.output()
    state = load_checkpoint_file(folder / "last.pth.tar")
    position = (state.get("resume_epoch"), state.get("resume_batch"))
    mid_epoch = position[0] == 0 and 0 < position[1] < total

    resumed = train_cli(env, "sigterm-resume", [*argv, "--resume", "auto"])
    rc2 = resumed.wait(env.left() + 30)
    text = resumed.output()
    status = _status(folder)
    epochs = _epoch_rows(folder)
    ok = rc == 0 and gone and stopped and mid_epoch and rc2 == 0 and "resumed from" in text
    ok = ok and status.get("finished") is True and len(epochs) == 1
    value = f"stopped at batch {position[1]}/{total}; resume exit {rc2}, finished={status.get('finished')}"
    detail = (
        f"SIGTERM exit {rc} ({'stop logged' if stopped else 'NO stop log'}), process group "
        f"{'empty' if gone else 'STILL ALIVE'}; --resume auto exit {rc2}, {len(epochs)} epoch row(s); "
        f"checkpoint every {interval} steps, {env.args.workers} loader workers"
    )
    raw = {"exit": [rc, rc2], "group_gone": gone, "position": position, "steps": total, "status": status}
    return check(name, ok, value, detail, raw)


def rows_syncs_and_loader(env: Env) -> list[Row]:
    """One in-process Trainer: host syncs over a whole fit(), then its loader alone vs its step alone."""
    from timm_cskd.config import parse_args
    from timm_cskd.train import Trainer

    trainer = Trainer(parse_args(trainer_argv(env, "syncs")))
    try:
        counter = SyncCounter(env.cuda)
        instrument(trainer, counter)
        marked = trainer.train_loader
        with counter:
            trainer.fit()
        trainer.train_loader = marked.loader
        s = counter.summary(WARMUP_STEPS)
        batch = marked.first_batch or {}
        probe = "CUDA sync debug mode" if env.cuda else "CPU proxy: Tensor.item/tolist/numpy, torch.equal"
        per_step = s["grad_scaler_in_steps"] / max(s["steps"] - WARMUP_STEPS, 1)
        places = "; ".join(f"{n}x {w}" for w, n in s["places_in_steps"].items())
        detail = (
            f"{probe}; {s['steps']} steps, first {WARMUP_STEPS} not counted ({s['in_warmup']} there); "
            f"log/checkpoint steps {s['at_log_steps']}; torch GradScaler.step {per_step:.1f}/step "
            "(reads found_inf unless the optimizer is fused: --opt-kwargs fused=True); batches "
            f"{batch.get('dtype')} on {batch.get('device')}, pinned={batch.get('pinned')}"
            + (f"; IN STEPS: {places}" if places else "")
        )
        # CUDA may synchronise with the stream to stage a copy from pageable memory, non_blocking or not:
        # the sync debug mode does not see it, so it is named here.
        pageable = env.cuda and batch.get("device") == "cpu" and batch.get("pinned") is False
        value = f"{s['in_steps']} outside log steps" + (
            "; batches pageable: the H2D copy may sync" if pageable else ""
        )
        raw = {**s, "batch": batch, "pageable_copy": pageable}
        sync_row = check("trainer host syncs", s["in_steps"] == 0, value, detail, raw)
        return [sync_row, loader_vs_step(env, trainer)]
    finally:
        trainer.close()


def loader_vs_step(env: Env, trainer) -> Row:
    """The loader's images/s (anchors + partners, its workers at full speed, nothing consuming) beside
    the images/s one GPU step consumes with the data already on the device."""
    from timm_cskd.throughput import images_in, loader_rates, median, time_rounds

    args, loader = env.args, trainer.train_loader
    # One epoch less its first batch, which waits on the workers' start.
    rates = loader_rates(loader, rounds=1, batches=len(loader) - 1, warmup=1, device=env.device)
    loader_ips = rates[0]

    trainer.task.train()
    images, target = next(iter(loader))
    updates = iter(range(10_000, 10_000 + 3 + args.demand_steps))

    def step():
        trainer._train_step(images, target, 1, True)
        trainer.task.update_ema(step=next(updates))

    step_s = median(
        time_rounds({"step": step}, rounds=1, calls=args.demand_steps, warmup=3, device=env.device)["step"]
    )
    loaded = images_in(images)
    demand = loaded / step_s
    per_worker = loader_ips / args.workers
    cores = os.cpu_count() or 1
    # Eight ranks each hold a core for their own main process; the rest can run loader workers.
    free_cores, need = max(cores - 8, 1), 8 * demand / per_worker
    verdict = "would starve" if need > free_cores else "would keep up"
    value = f"loader {loader_ips:.0f} img/s vs step {demand:.0f} img/s"
    detail = (
        f"{args.workers} workers, {per_worker:.0f} img/s each; a step takes {step_s * 1e3:.1f} ms for "
        f"{loaded} images ({args.trainer_batch} anchors + {loaded - args.trainer_batch} partners); "
        f"8 GPUs {verdict} on this machine's {cores} cores: they need {8 * demand:.0f} img/s = "
        f"{math.ceil(need)} workers, {free_cores} cores are left beside 8 ranks"
    )
    raw = {
        "loader_images_per_s": loader_ips,
        "workers": args.workers,
        "per_worker": per_worker,
        "step_s": step_s,
        "step_images": loaded,
        "demand_images_per_s": demand,
        "cores": cores,
        "workers_needed_8_gpus": need,
        "starves_8_gpus": need > free_cores,
    }
    return Row("loader vs GPU step", "measure", "ok", value, detail, raw)


def row_two_ranks(env: Env) -> Row:
    """Two ranks on the one device (gloo over its tensors: NCCL refuses two ranks on one GPU) through the
    Trainer's collectives: DDP, agreement, checkpoint gathers, BatchNorm sync. Both ranks must end with
    identical weights."""
    name, port = "trainer 2 ranks", str(free_port())
    argv = trainer_argv(env, "ranks", "-j", str(max(env.args.workers // 2, 1)), "--checkpoint-interval", "4")
    children = []
    for rank in (0, 1):
        result = env.work_dir / f"rank{rank}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "gpu_check.rank", str(result), json.dumps(argv)]
        extra = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                     LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")  # fmt: skip
        children.append((Child(env, f"rank{rank}", cmd, **extra), result))
    codes = [child.wait(env.left() + 30) for child, _ in children]
    for child, _ in children:
        child.output()
    results = [json.loads(r.read_text()) if r.exists() else {} for _, r in children]
    digests = [r.get("sha256") for r in results]
    status = _status(env.work_dir / "runs" / "ranks")
    devices = {r.get("device") for r in results}
    ok = codes == [0, 0] and digests[0] is not None and digests[0] == digests[1]
    ok = ok and status.get("finished") is True and all(r.get("backend") == "gloo" for r in results)
    value = f"weights {'identical' if digests[0] == digests[1] else 'DIFFER'} on both ranks"
    detail = (
        f"exit {codes}, backend {[r.get('backend') for r in results]}, device {sorted(map(str, devices))}, "
        f"{results[0].get('steps')} steps, world size {results[0].get('world_size')}, finished="
        f"{status.get('finished')}, final NLL {results[0].get('nll')}"
    )
    return check(name, ok, value, detail, {"exit": codes, "results": results, "status": status})
