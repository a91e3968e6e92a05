"""Two gloo processes under torchrun: weights stay identical, every validation image counts once."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PLAIN_RECIPE, make_image_folder

from timm_cskd.checkpoint import load_checkpoint_file
from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data.loader import build_transforms, build_val_prep, create_val_loader
from timm_cskd.evaluate import evaluate

HERE = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["anchor", "paired"])
def test_two_ranks_train_identically_and_validate_each_image_once(tmp_path, mode):
    import timm

    data = tmp_path / "data"
    make_image_folder(data / "train", [9, 7, 8, 1], size=(20, 20), noise=40)
    make_image_folder(data / "val", [3, 2, 1, 1], size=(20, 20), noise=40)  # 7 images: ranks get 4 and 3
    out = tmp_path / "out"
    args = [
        "--data-dir", str(data), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", "2", "-b", "4", "--lr", "0.05", *PLAIN_RECIPE, "-j", "0", "--output", str(out), "--experiment", "ddp",
        "--cskd-mode", mode, "--model-ema", "--log-interval", "1",
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(HERE / "ddp_worker.py"), *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    run_dir = out / "ddp"
    w0, w1 = (torch.load(run_dir / f"rank{r}.pt") for r in (0, 1))
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"{key} differs between ranks"
    e0, e1 = (torch.load(run_dir / f"ema{r}.pt") for r in (0, 1))
    for key in e0:
        assert torch.equal(e0[key], e1[key]), (
            f"EMA {key} differs between ranks: each rank averaged its own init"
        )
    m0, m1 = (json.loads((run_dir / f"metrics{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1
    assert m0["num_samples"] == 7

    # The same weights evaluated in one process give the same numbers.
    model = timm.create_model("test_resnet", num_classes=4)
    model.load_state_dict(w0)
    data_config = load_checkpoint_file(run_dir / "last.pth.tar")["data_config"]
    _, val_tf = build_transforms(parse_args(args), data_config)
    loader = create_val_loader(
        build_index(data / "val"),
        val_tf,
        8,
        num_replicas=1,
        rank=0,
        workers=0,
        prep=build_val_prep(data_config, "cpu"),
        pin_memory=False,
    )
    single = evaluate(model, loader, torch.device("cpu")).meter.compute()
    for key in ("top1_err", "top5_err", "nll", "ece", "brier", "num_samples"):
        assert single[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-6), key


def torchrun(nproc, args, env=None, extra=(), timeout=300):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", *extra, str(HERE / "ddp_worker.py"), *args,
    ]  # fmt: skip
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent), **(env or {}))
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def elastic_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("elastic")
    make_image_folder(data / "train", [12, 12, 12, 12], size=(20, 20), noise=40)  # 48 anchors
    make_image_folder(data / "val", [2, 2, 2, 2], size=(20, 20), noise=40)
    return data


def elastic_args(data, out, *extra):
    return [
        "--data-dir", str(data), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", "1", "-b", "4", "--lr", "0.05", *PLAIN_RECIPE, "-j", "0", "--output", str(out), "--experiment", "run",
        "--log-interval", "1", "--seed", "3", *extra,
    ]  # fmt: skip


def trained_pairs(record_dir, epoch=0):
    pairs = []
    for path in Path(record_dir).glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            e, batch = json.loads(line)
            if e == epoch:
                k = len(batch) // 2
                pairs += zip(batch[:k], batch[k:])
    return sorted(pairs)


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after", "stop"), [(2, 1, 2), (1, 2, 4)], ids=["2-to-1", "1-to-2"])
def test_elastic_resume_trains_the_epoch_plan_exactly_once(elastic_data, tmp_path, before, after, stop):
    """Preempted mid-epoch on one rank count, resumed on another: the epoch's trained (anchor, partner)
    pairs are the plan's, none lost, none repeated."""
    from timm_cskd.sampler import ClassPairSampler

    records = tmp_path / "records"
    records.mkdir()
    args = elastic_args(elastic_data, tmp_path / "out")
    env = {"RECORD_DIR": str(records)}
    first = torchrun(before, args, env=dict(env, STOP_AT_STEP=str(stop)))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stop requested (SIGTERM)" in first.stdout
    assert len(trained_pairs(records)) == stop * before * 4
    resumed = torchrun(after, [*args, "--resume", "auto"], env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "elastic resume" in resumed.stdout + resumed.stderr

    labels = build_index(elastic_data / "train").labels
    first_plan, partner_plan = ClassPairSampler(labels, 4, seed=3).plan()
    assert trained_pairs(records) == sorted(zip(first_plan.tolist(), partner_plan.tolist()))
    summary = (tmp_path / "out" / "run" / "summary.csv").read_text().splitlines()
    assert len(summary) == 2, "the epoch finished once"


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_training_finishes(elastic_data, tmp_path):
    args = elastic_args(
        elastic_data, tmp_path / "out", "--epochs", "2", "--checkpoint-interval", "2", "--resume", "auto"
    )
    # Rank 1 comes back late: torchrun's store still holds the first attempt's process-group
    # addresses, which rank 0 must not connect to.
    env = {"CRASH_AT_STEP": "5", "SLOW_RESTART": "3"}
    proc = torchrun(2, args, env=env, extra=["--max-restarts=1"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "no checkpoint in" in output, "the first attempt starts fresh"
    # From the step-4 checkpoint, or step 2's when torchrun stopped rank 0 while it was still writing it.
    assert re.search(r"resumed from \S+ at epoch 0, batch [24] ", output), "the restart resumes mid-epoch"
    summary = (tmp_path / "out" / "run" / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["0", "1"]


@pytest.mark.slow
def test_resume_fails_on_every_rank_when_one_cannot_read_the_checkpoint(elastic_data, tmp_path):
    """Nodes without shared storage: rank 0 finds a checkpoint that rank 1 cannot read. Before, rank 0
    resumed while rank 1 started fresh; now both stop with an error naming the rank, never a hang."""
    args = elastic_args(elastic_data, tmp_path / "out")
    env = {"PER_RANK_OUTPUT": "1"}
    assert torchrun(2, args, env=env).returncode == 0
    proc = torchrun(2, [*args, "--epochs", "2", "--resume", "auto"], env=env, timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "rank 1 on" in output and "node1/run/last.pth.tar" in output
    assert "every node must see the experiment folder" in output


def test_multi_node_restarts_on_a_shared_store_warn_with_the_fix(monkeypatch, caplog):
    from timm_cskd.distributed import Launch, _init_url

    torchrun = Launch(world_size=2, rank=0, local_rank=0, launcher="torchrun")

    env = {
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "3",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "GROUP_WORLD_SIZE": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert _init_url(torchrun) == "env://"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text
    caplog.clear()
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what torchrun sets under it
    assert _init_url(torchrun) == "env://"
    assert not caplog.text
