"""End-to-end training on tiny generated folders: every mode learns, resume is exact, bad input is clear."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PLAIN_RECIPE, make_image_folder, make_tiny_dataset

from timm_cskd.checkpoint import load_checkpoint_file
from timm_cskd.config import ConfigError, parse_args
from timm_cskd.train import main, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def tiny_args(data_dir, out, *extra):
    return [
        "--data-dir", str(data_dir), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", "3", "-b", "8", "--lr", "0.05", "--sched", "cosine", *PLAIN_RECIPE, "-j", "0",
        "--log-interval", "2", "--output", str(out), "--experiment", "run", "--seed", "1",
        *extra,
    ]  # fmt: skip


def summary(out):
    with open(Path(out) / "run" / "summary.csv") as f:
        return list(csv.DictReader(f))


def assert_loss_falls_and_adds_up(out, epochs, regularised=True):
    """The run's summary.csv: one row per epoch, the training loss falls, and every row's loss is its CE
    plus its regulariser term (positive, or exactly 0 for a method without one). Returns the rows."""
    rows = summary(out)
    assert len(rows) == epochs
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    for row in rows:
        loss, ce, reg = (float(row[k]) for k in ("train_loss", "train_ce", "train_reg"))
        assert loss == pytest.approx(ce + reg, rel=1e-6)
        assert reg > 0.0 if regularised else reg == 0.0
    return rows


@pytest.mark.parametrize(
    "extra",
    [
        ["--cskd-mode", "anchor"],
        ["--cskd-mode", "paired", "-b", "16"],
        ["--cskd-mode", "off"],
        ["--cskd-mode", "off", "--plain-sampler"],
        ["--cskd-mode", "anchor", "--mixup", "0.2", "--cutmix", "1.0"],
        ["--cskd-mode", "anchor", "--smoothing", "0.1"],
        ["--cskd-mode", "paired", "-b", "16", "--smoothing", "0.1", "--model-ema"],
    ],
    ids=["anchor", "paired", "off", "off-plain", "anchor-mixup", "anchor-smoothing", "paired-smoothing-ema"],
)
def test_each_mode_trains_and_loss_falls(data_dir, tmp_path, extra):
    metrics = run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "4", *extra)))
    assert_loss_falls_and_adds_up(tmp_path, 4, regularised="off" not in extra)
    assert metrics["num_samples"] == 20
    out = tmp_path / "run"
    assert {"args.yaml", "summary.csv", "log.txt", "last.pth.tar", "model_best.pth.tar"} <= set(
        os.listdir(out)
    )
    saved = yaml.safe_load((out / "args.yaml").read_text())
    assert saved["cskd_mode"] == extra[1] and saved["num_classes"] == 4


def test_checkpoint_is_loadable_by_timm(data_dir, tmp_path):
    import timm
    from timm.models import load_checkpoint

    run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "1", "--model-ema")))
    path = tmp_path / "run" / "last.pth.tar"
    checkpoint = load_checkpoint_file(path)
    assert {"state_dict", "state_dict_ema", "optimizer", "epoch", "args", "arch", "version"} <= set(
        checkpoint
    )
    assert checkpoint["epoch"] == 0 and checkpoint["version"] == 2
    model = timm.create_model("test_resnet", num_classes=4)
    for use_ema, key in ((False, "state_dict"), (True, "state_dict_ema")):
        load_checkpoint(model, str(path), use_ema=use_ema)
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, checkpoint[key][name])


def _final_weights(out):
    return load_checkpoint_file(Path(out) / "run" / "last.pth.tar")["state_dict"]


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _spawn(args):
    """The trainer in its own process group, as a batch scheduler starts a job."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(REPO / "train_imagenet.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


# Loader workers included: augmentation seeds come from the plan position, not a worker's RNG stream.
# Random erasing (on the device, seeded per sample) included.
EXACT = ["--mixup", "0.4", "--reprob", "0.5", "--epochs", "2", "--checkpoint-interval", "2", "-j", "2"]


def uninterrupted_run(data_dir, out, flags) -> dict:
    """The final checkpoint of a run in its own process, start to end."""
    proc = _spawn(tiny_args(data_dir, out, *flags))
    assert proc.wait() == 0, proc.stdout.read()
    return load_checkpoint_file(Path(out) / "run" / "last.pth.tar")


def killed_and_resumed_run(data_dir, out, flags) -> dict:
    """The final checkpoint of a run SIGKILLed at its first mid-epoch checkpoint, then resumed with
    --resume auto: a crash gives no chance to clean up."""
    proc = _spawn(tiny_args(data_dir, out, *flags))
    _wait_for(Path(out) / "run" / "last.pth.tar", proc)
    proc.kill()
    proc.wait()
    state = load_checkpoint_file(Path(out) / "run" / "last.pth.tar")
    assert state["resume_epoch"] == 0 and 0 < state["resume_batch"] < 6, "the kill must land mid-epoch"
    resumed = _spawn(tiny_args(data_dir, out, *flags, "--resume", "auto"))
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    return load_checkpoint_file(Path(out) / "run" / "last.pth.tar")


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    return uninterrupted_run(data_dir, tmp_path_factory.mktemp("uninterrupted"), EXACT)["state_dict"]


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_is_bit_identical(data_dir, tmp_path, uninterrupted):
    _assert_identical(killed_and_resumed_run(data_dir, tmp_path, EXACT)["state_dict"], uninterrupted)


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_cleanly_then_resumes_exactly(
    data_dir, tmp_path, uninterrupted
):
    proc = _spawn(tiny_args(data_dir, tmp_path, *EXACT))
    _wait_for(tmp_path / "run" / "last.pth.tar", proc)
    # SLURM preemption, scancel and kill -- -PGID signal the whole group: loader workers included.
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate()[0]
    assert proc.returncode == 0, output
    assert "stop requested (SIGTERM)" in output
    resumed = _spawn(tiny_args(data_dir, tmp_path, *EXACT, "--resume", "auto"))
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    _assert_identical(_final_weights(tmp_path), uninterrupted)


def test_truncated_checkpoint_is_skipped_with_warning(data_dir, tmp_path, capsys):
    run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "2", "--checkpoint-hist", "0")))
    last = tmp_path / "run" / "last.pth.tar"
    last.write_bytes(last.read_bytes()[:1000])
    (tmp_path / "run" / "model_best.pth.tar").unlink()
    capsys.readouterr()
    run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "2", "--resume", "auto")))
    output = capsys.readouterr().out
    assert "skipping" in output and "last.pth.tar" in output
    assert f"resumed from {tmp_path / 'run' / 'last-previous.pth.tar'} at epoch 1, batch 0" in output


def test_final_table_names_the_ece_bins_it_used(data_dir, tmp_path, capsys):
    from timm_cskd.train import main

    assert main(tiny_args(data_dir, tmp_path, "--epochs", "1", "--ece-bins", "7")) == 0
    lines = [line.rsplit("  ", 1) for line in capsys.readouterr().out.splitlines() if "(%)" in line]
    table = {name.strip(): value.strip() for name, value in lines}
    assert "ECE, 20 bins (%)" not in table
    assert table["ECE, 7 bins (%)"] == f"{float(summary(tmp_path)[-1]['eval_ece']):.2f}"


def test_existing_run_is_never_overwritten_by_accident(data_dir, tmp_path, capsys):
    run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "1")))
    before = (tmp_path / "run" / "last.pth.tar").read_bytes()
    capsys.readouterr()
    assert main(tiny_args(data_dir, tmp_path, "--epochs", "1")) == 2
    assert "already holds a training run: pass --resume auto" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pth.tar").read_bytes() == before
    run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "2", "--overwrite")))
    assert [row["epoch"] for row in summary(tmp_path)] == ["0", "1"], "the old summary rows were not removed"


def test_yaml_config_with_flag_override_and_typo(tmp_path, data_dir):
    config = tmp_path / "c.yaml"
    config.write_text("model: test_resnet\nepochs: 7\nbatch-size: 4\ndecay_milestones: [3, 5]\n")
    args = parse_args(["-c", str(config), "--epochs", "2", "--data-dir", str(data_dir)])
    assert (args.model, args.epochs, args.batch_size, args.decay_milestones) == ("test_resnet", 2, 4, [3, 5])
    assert parse_args(["-c", str(config), "--decay-milestones", "10", "20", "25"]).decay_milestones == [
        10,
        20,
        25,
    ]
    config.write_text("modle: resnet50\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'; did you mean 'model'"):
        parse_args(["-c", str(config)])
    config.write_text("cskd_mode: off\n")
    with pytest.raises(ConfigError, match="quote it"):
        parse_args(["-c", str(config)])


def test_shipped_configs_parse_to_the_paper_recipe():
    for name in ("resnet50", "resnet101", "resnext101_32x4d"):
        for suffix, method in (("cskd", "cskd"), ("ce", "ce"), ("cskd_paired", "cskd-paired")):
            args = parse_args(["-c", str(REPO / "configs" / f"{name}_{suffix}.yaml")])
            assert args.method == method
            assert (args.epochs, args.opt, args.momentum, args.weight_decay) == (90, "momentum", 0.9, 1e-4)
            assert (args.sched, args.decay_milestones, args.decay_rate) == ("multistep", [30, 60], 0.1)
            assert (args.warmup_epochs, args.sched_on_updates, args.smoothing, args.color_jitter) == (
                0,
                False,
                0.0,
                0.0,
            )
            assert args.lr_base == 0.1 and args.img_size == 224 and tuple(args.scale) == (0.08, 1.0)
            assert args.weight_decay_bias_bn, "the paper's code decays every parameter"
            assert args.amp and args.amp_dtype == "bfloat16" and args.channels_last
            assert args.batch_size * 8 == 256, (
                "8 GPUs x batch = the paper's 256 images with gradient per step"
            )
            if method != "ce":
                from timm_cskd.methods import resolve_method

                assert resolve_method(args)[1] == {"temperature": 4.0, "lambda": 1.0}


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda root: root / "missing", [], "does not exist"),
        (lambda root: (root / "empty").mkdir() or root / "empty", [], "no 'train' folder"),
        (lambda root: (root / "e" / "train").mkdir(parents=True) or root / "e", [], "no class sub-folders"),
        (None, ["--model", "resnet5O"], "unknown model 'resnet5O'; did you mean"),
        (None, ["--cskd-mode", "paired", "-b", "7"], "even --batch-size"),
        (None, ["--num-classes", "10"], "--num-classes is 10 but .* has 4 class folders"),
        (None, ["--plain-sampler"], "--plain-sampler"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, data_dir, capsys, make, extra, message):
    root = make(tmp_path) if make is not None else data_dir
    code = main(tiny_args(root, tmp_path / "out", *extra))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err


def test_class_with_a_single_image_trains(tmp_path):
    root = tmp_path / "d"
    make_image_folder(root / "train", [6, 1, 5], size=(20, 20))
    make_image_folder(root / "val", [2, 1, 2], size=(20, 20))
    metrics = run(parse_args(tiny_args(root, tmp_path, "--epochs", "1", "-b", "4")))
    assert metrics["num_samples"] == 5


def test_demo_defaults_resolve_to_demo_config():
    args = parse_args([], default_config=REPO / "configs" / "demo.yaml")
    assert args.data_dir is None and args.model == "resnet18" and args.config.endswith("demo.yaml")


def test_resume_with_other_settings_is_a_clear_error(data_dir, tmp_path, capsys):
    run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "1")))
    capsys.readouterr()
    assert (
        main(tiny_args(data_dir, tmp_path, "--epochs", "2", "--cskd-mode", "paired", "--resume", "auto")) == 2
    )
    err = capsys.readouterr().err
    assert "cannot continue with these settings" in err and "mode" in err
    assert main(tiny_args(data_dir, tmp_path, "--resume", str(tmp_path / "nope.pth.tar"))) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
def test_torchcompile_trains_and_saves_plain_keys(data_dir, tmp_path):
    metrics = run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "1", "--torchcompile", "--model-ema")))
    assert metrics["num_samples"] == 20
    checkpoint = load_checkpoint_file(tmp_path / "run" / "last.pth.tar")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["state_dict"])
    assert checkpoint["state_dict"].keys() == checkpoint["state_dict_ema"].keys()


def test_trains_from_list_files(data_dir, tmp_path):
    root = tmp_path / "lists"
    root.mkdir()
    for split in ("train", "val"):
        # Absolute paths: a list file's paths may point anywhere (relative ones start at its folder).
        lines = [f"{p} {int(p.parent.name[-3:])}" for p in sorted((data_dir / split).glob("*/*.jpg"))]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    metrics = run(parse_args(tiny_args(root, tmp_path, "--epochs", "1")))
    assert metrics["num_samples"] == 20


@pytest.mark.parametrize("flag", ["--weight-decay-bias-bn", "--no-weight-decay-bias-bn"])
def test_weight_decay_reaches_bias_and_bn_only_when_asked(data_dir, tmp_path, flag):
    from timm_cskd.train import Trainer

    trainer = Trainer(parse_args(tiny_args(data_dir, tmp_path, flag)))
    groups = trainer.optimizer.param_groups
    decayed = sum(p.numel() for g in groups if g["weight_decay"] > 0 for p in g["params"])
    total = sum(p.numel() for p in trainer.task.get_trainable_module().parameters())
    trainer.close()
    if flag == "--weight-decay-bias-bn":
        assert decayed == total
    else:
        assert 0 < decayed < total


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_and_channels_last_train(data_dir, tmp_path, dtype):
    extra = ["--epochs", "4", "--amp", "--amp-dtype", dtype, "--channels-last"]
    run(parse_args(tiny_args(data_dir, tmp_path, *extra)))
    rows = summary(tmp_path)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    checkpoint = load_checkpoint_file(tmp_path / "run" / "last.pth.tar")
    assert ("amp_scaler" in checkpoint) == (dtype == "float16"), "a GradScaler only for float16"
    assert all(t.dtype == torch.float32 for t in checkpoint["state_dict"].values() if t.is_floating_point())


def timm_loop_lrs(sched_kwargs, epochs, updates_per_epoch, lr):
    """The learning rate of every update as timm's train.py steps its scheduler: step_update after each
    update, step at each epoch end."""
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, num_epochs=epochs, updates_per_epoch=updates_per_epoch, **sched_kwargs
    )
    lrs, updates = [], 0
    for epoch in range(num_epochs):
        for _ in range(updates_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            updates += 1
            scheduler.step_update(num_updates=updates)
        scheduler.step(epoch + 1)
    return lrs


@pytest.mark.parametrize("on_updates", [False, True], ids=["per-epoch", "per-update"])
@pytest.mark.parametrize("accum", [1, 2])
def test_learning_rate_of_every_update_follows_timms_scheduler(
    data_dir, tmp_path, monkeypatch, on_updates, accum
):
    """Multistep /10 at epochs 1 and 2 after a 1-epoch warmup, through the real loop (gradient
    accumulation included: the schedule counts optimizer updates)."""
    from timm_cskd.train import Trainer

    seen = []
    step = Trainer._train_step

    def record(self, images, target, group, update):
        if update:
            seen.append(self.optimizer.param_groups[0]["lr"])
        return step(self, images, target, group, update)

    monkeypatch.setattr(Trainer, "_train_step", record)
    extra = ["--sched", "multistep", "--decay-milestones", "1", "2", "--lr", "0.1", "--warmup-epochs", "1",
             "--epochs", "3", "--grad-accum-steps", str(accum)]  # fmt: skip
    if on_updates:
        extra.append("--sched-on-updates")
    run(parse_args(tiny_args(data_dir, tmp_path, *extra)))
    updates = -(-6 // accum)  # 48 images / -b 8 = 6 batches an epoch
    sched = dict(sched="multistep", decay_milestones=[1, 2], decay_rate=0.1, warmup_epochs=1, warmup_lr=1e-5,
                 step_on_epochs=not on_updates)  # fmt: skip
    assert seen == pytest.approx(timm_loop_lrs(sched, 3, updates, 0.1))
    assert len({round(lr, 9) for lr in seen}) >= 2, (
        "the schedule must move for the comparison to mean anything"
    )


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_is_refused_and_a_killed_run_leaves_no_stale_lock(
    data_dir, tmp_path, capsys
):
    import socket

    from timm_cskd.train import Trainer

    first = _spawn(tiny_args(data_dir, tmp_path, "--epochs", "200", "-j", "2", "--checkpoint-interval", "1"))
    _wait_for(tmp_path / "run" / "last.pth.tar", first)
    # The same job submitted again while the first still runs.
    code = main(tiny_args(data_dir, tmp_path, "--epochs", "200", "--resume", "auto"))
    err = capsys.readouterr().err
    assert first.poll() is None, "the first run must still be running"
    assert code == 2
    assert f"in use by another run (pid {first.pid} on host {socket.gethostname()}" in err
    first.kill()  # SIGKILL: no chance to release anything; its loader workers linger a moment
    first.wait()
    trainer = Trainer(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "200", "--resume", "auto")))
    trainer.close()
    assert trainer.state.global_step > 0, "it resumed"


def test_non_finite_loss_stops_with_the_step_and_never_saves_bad_weights(data_dir, tmp_path, capsys):
    code = main(
        tiny_args(data_dir, tmp_path, "--lr", "1e8", "--checkpoint-interval", "1", "--log-interval", "1")
    )
    assert code == 2
    err = capsys.readouterr().err
    step = int(re.search(r"the loss became NaN/inf at step (\d+)", err).group(1))
    assert "lower --lr" in err
    for name in ("last.pth.tar", "last-previous.pth.tar"):
        path = tmp_path / "run" / name
        if path.exists():
            checkpoint = load_checkpoint_file(path)
            assert checkpoint["global_step"] < step
            assert all(
                torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point()
            )


def test_resume_auto_takes_the_furthest_trained_checkpoint_whatever_its_step_unit(tmp_path):
    """After growing from 4 to 8 ranks an epoch has half the steps: last.pth.tar's step count is lower
    than an older checkpoint's, but it is further into training."""
    from timm_cskd.checkpoint import find_resume_checkpoint, save_checkpoint

    def checkpoint(epoch, step, units, old_format=False):
        sampler = (
            {"batches_consumed": units // 8, "batch_size": 8, "mode": "anchor", "num_replicas": 1}
            if old_format
            else {"units_consumed": units}
        )
        return {"state_dict": {}, "global_step": step, "resume_epoch": epoch, "sampler": sampler}

    save_checkpoint(checkpoint(10, 10_000, 0), tmp_path / "last-previous.pth.tar")
    save_checkpoint(checkpoint(9, 9_000, 0), tmp_path / "model_best.pth.tar")
    save_checkpoint(checkpoint(10, 5_300, 24_000), tmp_path / "last.pth.tar")
    path, state = find_resume_checkpoint(tmp_path)
    assert path.name == "last.pth.tar" and state["global_step"] == 5_300
    save_checkpoint(checkpoint(10, 10_500, 32_000, old_format=True), tmp_path / "last-previous.pth.tar")
    assert find_resume_checkpoint(tmp_path)[0].name == "last-previous.pth.tar"


def test_a_failed_checkpoint_write_stops_the_run_with_the_path(data_dir, tmp_path, capsys, monkeypatch):
    from timm_cskd import checkpoint

    def full_disk(state, path, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    assert main(tiny_args(data_dir, tmp_path, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'run' / 'last.pth.tar'}" in err and "No space left" in err


def test_sigterm_during_validation_stops_after_the_epoch_save(data_dir, tmp_path, capsys, monkeypatch):
    """torchrun SIGKILLs 30 s after its SIGTERM: a notice that lands while validating must not start
    another epoch."""
    from timm_cskd.train import Trainer

    validate = Trainer.validate

    def validate_then_preempted(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return validate(self)

    monkeypatch.setattr(Trainer, "validate", validate_then_preempted)
    assert main(tiny_args(data_dir, tmp_path, "--epochs", "3")) == 0
    assert "saved last.pth.tar at the end of epoch 1, exiting" in capsys.readouterr().out
    state = load_checkpoint_file(tmp_path / "run" / "last.pth.tar")
    assert (state["resume_epoch"], state["resume_batch"]) == (1, 0)
    assert len(summary(tmp_path)) == 1


def test_lock_on_file_systems_without_flock_and_held_from_another_node(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl
    import json

    from timm_cskd import run_lock

    real_flock = fcntl.flock
    monkeypatch.setattr(
        fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no flock"))
    )
    with caplog.at_level("WARNING"), run_lock.RunLock(tmp_path):
        pass
    assert "has no flock" in caplog.text, "Lustre without flock runs unlocked, with a warning"
    monkeypatch.setattr(fcntl, "flock", real_flock)

    # Another node holds the lock (a live run there, or a dead node's lock until the NFS lease ends).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path / run_lock.LOCK_NAME)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    (tmp_path / run_lock.LOCK_NAME).write_text(
        json.dumps({"host": "node17", "pid": 4242, "command": "train"})
    )
    monkeypatch.setattr(run_lock, "REMOTE_GRACE_S", 1.0)
    start = time.monotonic()
    with pytest.raises(run_lock.RunLockedError, match=r"pid 4242 on host node17.*delete .*\.run\.lock"):
        run_lock.RunLock(tmp_path).acquire()
    assert time.monotonic() - start >= 1.0, "a remote holder is waited for (NFSv4 lease expiry)"
    holder.kill()
    holder.wait()


def test_val_interval_validates_every_n_epochs_and_the_last(data_dir, tmp_path):
    metrics = run(parse_args(tiny_args(data_dir, tmp_path, "--epochs", "5", "--val-interval", "2")))
    rows = summary(tmp_path)
    assert [bool(row["eval_top1_err"]) for row in rows] == [False, True, False, True, True]
    assert metrics["num_samples"] == 20
