"""Two gloo processes under torchrun: weights stay identical, every validation image counts once."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from timm_cskd.checkpoint import load_checkpoint_file
from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data.loader import build_transforms, create_val_loader
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
        "--epochs", "2", "-b", "4", "--lr", "0.05", "-j", "0", "--output", str(out), "--experiment", "ddp",
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
    m0, m1 = (json.loads((run_dir / f"metrics{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1
    assert m0["num_samples"] == 7

    # The same weights evaluated in one process give the same numbers.
    model = timm.create_model("test_resnet", num_classes=4)
    model.load_state_dict(w0)
    data_config = load_checkpoint_file(run_dir / "last.pth.tar")["data_config"]
    _, val_tf = build_transforms(parse_args(args), data_config)
    loader = create_val_loader(
        build_index(data / "val"), val_tf, 8, num_replicas=1, rank=0, workers=0, pin_memory=False
    )
    single = evaluate(model, loader, torch.device("cpu")).meter.compute()
    for key in ("top1_err", "top5_err", "nll", "ece", "brier", "num_samples"):
        assert single[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-6), key
