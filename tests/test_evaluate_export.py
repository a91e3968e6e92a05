"""Evaluate, compare and export on checkpoints the trainer writes, and export round trips into timm."""

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import fake_hub
import numpy as np
import pytest
import timm
import torch
from calibration_reference import calibration_metrics, grid_temperature, nll
from conftest import PLAIN_RECIPE, make_image_folder
from huggingface_hub import ModelCard, constants
from PIL import Image

from timm_cskd import compare, evaluate, export
from timm_cskd.config import parse_args
from timm_cskd.results import TIMM_COLUMNS
from timm_cskd.train import run

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"top1_err", "top5_err", "nll", "ece", "brier", "conf_gap", "recall_at_1", "num_samples"}
TS_KEYS = {"temperature", "nll_ts", "ece_ts", "conf_gap_ts"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    data = root / "data"
    make_image_folder(data / "train", [10, 10, 10], size=(20, 20), noise=50)
    make_image_folder(data / "val", [4, 3, 4], size=(20, 20), noise=50)
    # Training images, one per class filed under the next class: confident mistakes make the NLL-optimal
    # temperature an interior one. Images 4-7: the first 4 of class_000 are byte-identical to val's (both
    # folders draw from one seeded generator), and evaluate refuses copies of evaluated images.
    for c in range(3):
        (data / "calib" / f"class_{c:03d}").mkdir(parents=True)
        for i, source in enumerate([*[(c, 4 + i) for i in range(4)], ((c + 1) % 3, 9)]):
            image = data / "train" / f"class_{source[0]:03d}" / f"img_{source[1]:04d}.jpg"
            (data / "calib" / f"class_{c:03d}" / f"img_{i:04d}.jpg").write_bytes(image.read_bytes())
    args = [
        "--data-dir", str(data), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", "2", "-b", "6", "--lr", "0.05", *PLAIN_RECIPE, "-j", "0", "--output", str(root / "out"),
        "--experiment", "run", "--model-ema",
    ]  # fmt: skip
    metrics = run(parse_args(args))
    return data, root / "out" / "run", metrics


def test_evaluate_training_checkpoint(trained, tmp_path):
    data, run_dir, train_metrics = trained
    out = tmp_path / "eval"
    code = evaluate.main(
        ["--checkpoint", str(run_dir / "last.pth.tar"), "--data-dir", str(data), "--output", str(out),
         "--save-predictions", "-j", "0"]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert not set(metrics) & TS_KEYS, "no temperature without --calib-split"
    assert metrics["num_samples"] == 11
    # The trainer's last validation used the same weights and preprocessing.
    for key in ("top1_err", "top5_err", "nll", "ece", "brier"):
        assert metrics[key] == pytest.approx(train_metrics[key], rel=1e-5, abs=1e-6)
    with Image.open(out / "reliability.png") as img:
        assert img.size[0] > 100 and img.size[1] > 100
    predictions = np.load(out / "predictions.npz")
    assert predictions["probs"].shape == (11, 3)
    np.testing.assert_allclose(predictions["probs"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(predictions["labels"], [0] * 4 + [1] * 3 + [2] * 4)
    assert predictions["features"].shape[0] == 11
    top1 = (predictions["probs"].argmax(1) != predictions["labels"]).mean() * 100
    assert metrics["top1_err"] == pytest.approx(top1)
    gap = 100 * predictions["probs"].max(1).mean() - (100 - top1)
    assert metrics["conf_gap"] == pytest.approx(gap, rel=1e-5, abs=1e-5)

    ema_out = tmp_path / "eval-ema"
    assert evaluate.main(["--checkpoint", str(run_dir / "last.pth.tar"), "--data-dir", str(data), "--ema",
                          "--output", str(ema_out), "-j", "0"]) == 0  # fmt: skip
    assert json.loads((ema_out / "metrics.json").read_text())["ema"] is True


def test_calib_split_temperature_scaling(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    common = ["--checkpoint", str(run_dir / "last.pth.tar"), "--data-dir", str(data), "-j", "0"]
    out = tmp_path / "val"
    assert evaluate.main([*common, "--calib-split", "calib", "--save-predictions", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS | TS_KEYS
    assert metrics["calib_num_samples"] == 15
    # The calibration split's logits up to a per-image constant, which softmax(z / T) ignores.
    assert (
        evaluate.main([*common, "--split", "calib", "--save-predictions", "--output", str(tmp_path / "c")])
        == 0
    )
    calib = np.load(tmp_path / "c" / "predictions.npz")
    calib_logits = np.log(calib["probs"].astype(np.float64))
    best, step = grid_temperature(calib_logits, calib["labels"])
    assert 0.05 < best < 20, "the check needs an interior optimum"
    assert abs(math.log(metrics["temperature"]) - math.log(best)) <= step + 1e-5
    assert (
        nll(calib_logits, calib["labels"], metrics["temperature"])
        <= nll(calib_logits, calib["labels"], best) + 1e-9
    )

    val = np.load(out / "predictions.npz")
    expected = calibration_metrics(
        np.log(val["probs"].astype(np.float64)) / metrics["temperature"], val["labels"]
    )
    for key, value in expected.items():
        assert metrics[f"{key}_ts"] == pytest.approx(value, rel=1e-4, abs=1e-4), key

    capsys.readouterr()
    assert evaluate.main([*common, "--calib-split", "val", "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--calib-split" in err and "shares 11 of its 11 images with the evaluated split" in err
    listed = tmp_path / "listed"
    listed.mkdir()
    for name in ("train", "val"):
        os.symlink(data / name, listed / name)
    # A list file naming two of the evaluated folder's images is no held-out split either.
    (listed / "calib.txt").write_text("val/class_000/img_0000.jpg 0\ntrain/class_001/img_0000.jpg 1\n")
    common[3] = str(listed)
    assert evaluate.main([*common, "--calib-split", "calib", "--output", str(tmp_path / "bad")]) == 2
    assert "shares 1 of its 2 images" in capsys.readouterr().err
    assert evaluate.main([*common, "--calib-split", "nope", "--output", str(tmp_path / "bad")]) == 2
    assert "no 'nope' folder or list file" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


class FlagRecorder(torch.nn.Module):
    """Records the float32 precision settings its forward runs under; raises when told to."""

    def __init__(self, fail=False):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.fail, self.seen = fail, []

    def forward(self, x):
        backends = torch.backends
        self.seen.append(
            (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
        )
        if self.fail:
            raise RuntimeError("forward failed")
        return self.fc(x)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_evaluation_runs_without_tf32_and_restores_the_flags(precision):
    batches = [(torch.randn(2, 4), torch.tensor([0, 2])), (torch.randn(1, 4), torch.tensor([1]))]
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        # As distributed.setup_context leaves them for training on CUDA.
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = True
        model = FlagRecorder()
        evaluate.evaluate(model, batches, torch.device("cpu"))
        assert model.seen == [(False, False, "highest")] * 2
        assert torch.get_float32_matmul_precision() == precision
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError, match="forward failed"):
            evaluate.evaluate(FlagRecorder(fail=True), batches, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == precision
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def _precision():
    backends = torch.backends
    return backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()


def test_recall_shortlist_runs_in_full_float32_when_training_left_tf32_on(trained, tmp_path, monkeypatch):
    data, run_dir, _ = trained
    seen, cdist = [], torch.cdist

    def recording_cdist(*args, **kwargs):  # the shortlist's matrix products
        seen.append(_precision())
        return cdist(*args, **kwargs)

    monkeypatch.setattr(torch, "cdist", recording_cdist)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")  # as distributed.setup_context leaves them on CUDA
        torch.backends.cudnn.allow_tf32 = True
        argv = ["--checkpoint", str(run_dir / "last.pth.tar"), "--data-dir", str(data), "-j", "0"]
        assert evaluate.main([*argv, "--recall-chunk", "4", "--output", str(tmp_path / "eval")]) == 0
        assert _precision() == (True, True, "medium"), "the caller's settings are restored"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
    assert len(seen) == 3 and set(seen) == {(False, False, "highest")}, seen  # 11 images, 4 a chunk


class Embedding(torch.nn.Module):
    """A timm-like model whose pooled features are its inputs."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(dim, num_classes)

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _evaluating_rank(rank, world_size, store, features, labels, out):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size
    )
    torch.manual_seed(0)
    model = Embedding(features.shape[1], int(labels.max()) + 1)
    shard = torch.arange(rank, len(labels), world_size)  # the validation sharding: r, r + W, ...
    batches = [(features[i], labels[i]) for i in shard.split(4)]
    result = evaluate.evaluate(model, batches, torch.device("cpu"), collect=True, save_logits=True)
    held = {"features": result.features, "labels": result.labels, "logits": result.logits}
    if rank == 0:
        held["recall"] = evaluate.recall_at_1(result, chunk_size=16)
        held["expected_logits"] = model(features)
    torch.save(held, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 20 s on two shared cores, mostly imports
def test_two_rank_recall_equals_a_float64_brute_force_and_only_rank_0_holds_the_features(tmp_path):
    generator = torch.Generator().manual_seed(3)
    n, dim = 61, 8  # odd: rank 1 holds one image fewer
    labels = torch.randint(0, 4, (n,), generator=generator)
    centres = torch.randn(4, dim, generator=generator)
    features = centres[labels] + 0.8 * torch.randn(n, dim, generator=generator)
    torch.multiprocessing.spawn(
        _evaluating_rank, args=(2, tmp_path / "store", features, labels, tmp_path), nprocs=2
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank1 == {"features": None, "labels": None, "logits": None}
    torch.testing.assert_close(rank0["features"], features, rtol=0, atol=0)
    torch.testing.assert_close(rank0["labels"], labels, rtol=0, atol=0)
    torch.testing.assert_close(rank0["logits"], rank0["expected_logits"])

    exact = torch.cdist(features.double(), features.double())
    exact.fill_diagonal_(float("inf"))
    hits = (labels[exact.argmin(dim=1)] == labels).sum().item()
    assert 0 < hits < n
    assert rank0["recall"] == pytest.approx(100.0 * hits / n)


def test_evaluate_state_dict_and_exported_folder_agree(trained, tmp_path):
    data, run_dir, _ = trained
    checkpoint = torch.load(run_dir / "last.pth.tar", weights_only=True)
    plain = tmp_path / "plain.pth"
    torch.save(checkpoint["state_dict"], plain)
    exported = export.export(run_dir / "last.pth.tar", tmp_path / "exported")
    results = {}
    for name, extra in {
        "ckpt": ["--checkpoint", str(run_dir / "last.pth.tar")],
        "plain": [
            "--checkpoint",
            str(plain),
            "--model",
            "test_resnet",
            "--img-size",
            "32",
            "--crop-pct",
            "1.0",
        ],
        "local-dir": ["--checkpoint", str(exported)],
    }.items():
        assert (
            evaluate.main([*extra, "--data-dir", str(data), "--output", str(tmp_path / name), "-j", "0"]) == 0
        )
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    for key in ("top1_err", "nll", "ece", "recall_at_1"):
        assert results["plain"][key] == pytest.approx(results["ckpt"][key], rel=1e-6)
        assert results["local-dir"][key] == pytest.approx(results["ckpt"][key], rel=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_evaluation_equals_one(trained, tmp_path):
    data, run_dir, _ = trained
    common = [
        "--checkpoint",
        str(run_dir / "last.pth.tar"),
        "--data-dir",
        str(data),
        "-j",
        "0",
        "--save-predictions",
        "--calib-split",
        "calib",
    ]
    assert evaluate.main([*common, "--output", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "timm_cskd.evaluate", *common, "--output", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(
        cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in METRIC_KEYS | TS_KEYS:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    p1, p2 = np.load(tmp_path / "one" / "predictions.npz"), np.load(tmp_path / "two" / "predictions.npz")
    np.testing.assert_array_equal(p1["labels"], p2["labels"])
    np.testing.assert_allclose(p1["probs"], p2["probs"], rtol=1e-5, atol=1e-7)


def test_compare_table_and_overlay(trained, tmp_path, capsys):
    data, run_dir, _ = trained
    for name, extra in (("a", []), ("b", ["--ema"])):
        evaluate.main(["--checkpoint", str(run_dir / "last.pth.tar"), "--data-dir", str(data), *extra,
                       "--output", str(tmp_path / name), "-j", "0"])  # fmt: skip
    capsys.readouterr()
    png = tmp_path / "overlay.png"
    assert (
        compare.main(
            [str(tmp_path / "a"), str(tmp_path / "b"), "--names", "CE", "CS-KD", "--output", str(png)]
        )
        == 0
    )
    table = capsys.readouterr().out
    metrics_a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert "| Method | Top-1 err (%) ↓ |" in table
    assert f"| CE | {metrics_a['top1_err']:.2f} |" in table
    assert "| CS-KD |" in table
    with Image.open(png) as img:
        assert img.size[0] > 100
    assert compare.main([str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_export_round_trip_into_timm(tmp_path, name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    classes = [f"n0{i}" for i in range(7)]
    data_config = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                   "std": (0.25, 0.25, 0.25), "crop_pct": 0.875}  # fmt: skip
    ckpt = tmp_path / "last.pth.tar"
    torch.save({"state_dict": model.state_dict(), "arch": name, "num_classes": 7, "class_names": classes,
                "data_config": data_config, "global_step": 1, "args": {"model": name, "cskd_mode": "anchor"}}, ckpt)  # fmt: skip
    out = export.export(ckpt, tmp_path / "exported")

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 7 and config["architecture"] == name
    assert config["label_names"] == classes
    cfg = config["pretrained_cfg"]
    assert tuple(cfg["input_size"]) == (3, 64, 64) and cfg["crop_pct"] == 0.875
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.25, 0.25, 0.25)
    assert loaded.pretrained_cfg["label_names"] == classes
    assert cfg["tag"] == "cskd", "the architecture's default weight tag must not describe our weights"
    assert "| method | cskd |" in (out / "README.md").read_text()


def test_export_errors_are_clear(tmp_path, capsys, monkeypatch):
    truncated = tmp_path / "broken.pth.tar"
    model = timm.create_model("resnet18", num_classes=3)
    torch.save({"state_dict": model.state_dict(), "arch": "resnet18", "global_step": 1}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": [1, 2, 3]}, foreign)
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": model.state_dict(), "arch": "resnet34"}, wrong)
    for path, message in ((truncated, "not a readable PyTorch checkpoint"), (foreign, "neither a training checkpoint"),
                          (wrong, "does not fit resnet34"), (tmp_path / "nope.pth", "not found")):  # fmt: skip
        assert export.main(["--checkpoint", str(path), "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert "Traceback" not in err

    good = tmp_path / "good.pth.tar"
    torch.save({"state_dict": model.state_dict(), "arch": "resnet18", "num_classes": 3}, good)
    no_login(monkeypatch, tmp_path)
    assert (
        export.main(["--checkpoint", str(good), "--output", str(tmp_path / "o"), "--push-to-hub", "me/m"])
        == 2
    )
    assert "needs a Hugging Face token: run `hf auth login` or set HF_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "nothing is exported before the token check"
    assert evaluate.main(["--checkpoint", str(truncated), "--data-dir", str(tmp_path)]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("name", ["last.pth.tar", "model_best.pth.tar"])
def test_model_card_shows_the_validation_of_the_exported_weights(trained, tmp_path, name, ema):
    import csv

    _, run_dir, _ = trained
    epoch = torch.load(run_dir / name, weights_only=True)["epoch"]
    with open(run_dir / "summary.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["epoch"] == str(epoch))
    prefix = "eval_ema_" if ema else "eval_"
    assert f"{prefix}top1_err" in row, "summary.csv records the EMA's validation too"
    out = export.export(run_dir / name, tmp_path / "card", ema=ema)
    card = (out / "README.md").read_text()
    assert f"after epoch {epoch + 1}" in card
    for key, label in (("top1_err", "top-1 error (%)"), ("nll", "NLL"), ("ece", "ECE, 20 bins (%)")):
        assert f"| {label} | {float(row[prefix + key]):.4g} |" in card, (key, card)
    results = ModelCard.load(out / "README.md").data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == {
        key: float(row[prefix + key]) for key in ("top1_err", "top5_err", "ece", "nll")
    }, "the hub's model-index carries the same validation"
    assert {r.dataset_name for r in results} == {"data"}, "the training run's --data-dir folder"


def test_model_card_takes_the_epochs_last_validation(trained, tmp_path):
    """A run killed between writing an epoch's summary row and its checkpoint validates that epoch
    again on resume: the checkpoint holds the second pass's weights, the last row of the epoch."""
    import csv
    import shutil

    _, run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with open(copy / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epoch = torch.load(copy / "last.pth.tar", weights_only=True)["epoch"]
    again = next(r for r in rows if r["epoch"] == str(epoch)) | {"eval_top1_err": "12.5"}
    with open(copy / "summary.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow(again)
    card = (export.export(copy / "last.pth.tar", tmp_path / "card") / "README.md").read_text()
    assert "| top-1 error (%) | 12.5 |" in card


# ---------------------------------------------------------------------------------------------- timm's results file


def test_results_file_has_timm_validate_columns_and_units(trained, tmp_path):
    """Read back with timm validate.py's column names: top1/top5 in percent, param_count in millions."""
    data, run_dir, _ = trained
    results = tmp_path / "tables" / "results.csv"
    results.parent.mkdir()
    results.write_text("an earlier table\n")  # timm's validate.py replaces its results file
    argv = ["--checkpoint", str(run_dir / "last.pth.tar"), "--data-dir", str(data), "--output", str(tmp_path / "e"),
            "--save-predictions", "--calib-split", "calib", "-j", "0"]  # fmt: skip
    assert evaluate.main([*argv, "--results-file", str(results)]) == 0
    with open(results, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert len(rows) == 1
    row = rows[0]
    assert tuple(reader.fieldnames[: len(TIMM_COLUMNS)]) == TIMM_COLUMNS
    assert reader.fieldnames[len(TIMM_COLUMNS) :][:5] == ["nll", "ece", "brier", "conf_gap", "recall_at_1"]
    assert {"temperature", "nll_ts", "ece_ts", "conf_gap_ts"} <= set(reader.fieldnames)

    predictions = np.load(tmp_path / "e" / "predictions.npz")
    probs, labels = predictions["probs"], predictions["labels"]
    top1 = 100 * (probs.argmax(1) == labels).mean()
    top5 = 100 * (np.argsort(-probs, 1)[:, :5] == labels[:, None]).any(1).mean()
    assert float(row["top1"]) == pytest.approx(round(top1, 4), abs=1e-4)
    assert float(row["top1_err"]) == pytest.approx(round(100 - top1, 4), abs=1e-4)
    assert float(row["top5"]) == pytest.approx(round(top5, 4), abs=1e-4)
    model = timm.create_model("test_resnet", num_classes=3)
    assert float(row["param_count"]) == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert row["model"] == "test_resnet"
    data_config = torch.load(run_dir / "last.pth.tar", weights_only=False)["data_config"]
    assert int(row["img_size"]) == 32 == data_config["input_size"][-1]
    assert float(row["crop_pct"]) == 1.0 and row["interpolation"] == data_config["interpolation"]
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    for key in ("nll", "ece", "brier", "conf_gap", "recall_at_1", "ece_ts"):
        assert float(row[key]) == pytest.approx(metrics[key], rel=1e-12)

    as_json = tmp_path / "results.json"
    assert evaluate.main([*argv, "--results-file", str(as_json), "--results-format", "json"]) == 0
    parsed = json.loads(as_json.read_text())
    assert isinstance(parsed, dict), "one model: timm dumps its results dict"
    assert {k: str(v) for k, v in parsed.items()} == row


# ---------------------------------------------------------------------------------------------- the hub


def no_login(monkeypatch, tmp_path):
    """No token anywhere huggingface_hub looks: the environment, or the saved login (HF_HOME/token, whose
    path the library fixed at import)."""
    for variable in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    ):
        monkeypatch.delenv(variable, raising=False)
    # A CI machine may run the suite with HF_HUB_OFFLINE=1, which the library read at import; the fake
    # hub never reaches the network.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))


@pytest.fixture
def hub_export(tmp_path):
    """A checkpoint and the metrics.json of its evaluation, as evaluate writes it."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3)
    checkpoint = tmp_path / "good.pth.tar"
    torch.save({"state_dict": model.state_dict(), "arch": "resnet18", "num_classes": 3}, checkpoint)
    metrics = {"top1_err": 12.5, "top5_err": 1.25, "nll": 0.4375, "ece": 3.5, "brier": 0.2, "num_samples": 80,
               "ece_bins": 15, "evaluated": {"model": "resnet18", "dataset": "fmnist100", "split": "val"}}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return checkpoint, tmp_path / "metrics.json", metrics


def test_push_to_hub_with_the_saved_login_uploads_the_export_to_the_named_repository(tmp_path, hub_export):
    """In its own process, as a user runs it: no HF_TOKEN, the token of `hf auth login` in HF_HOME/token;
    the hub client's methods recorded instead of sent."""
    checkpoint, metrics_file, metrics = hub_export
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    (hf_home / "token").write_text("hf_saved_login_token\n")
    record, out = tmp_path / "hub.json", tmp_path / "exported"
    script = (
        "import sys, fake_hub; fake_hub.install(sys.argv[1]); from timm_cskd import export; "
        "sys.exit(export.main(sys.argv[2:]))"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
        )
    }
    env |= {"HF_HOME": str(hf_home), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    argv = ["--checkpoint", str(checkpoint), "--output", str(out), "--metrics", str(metrics_file),
            "--push-to-hub", "my-org/resnet18-cskd", "--private", "--revision", "v1"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(record), *argv], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "uploaded to https://huggingface.co/my-org/resnet18-cskd/commit/" in done.stdout

    calls = fake_hub.read(record)["calls"]
    assert [c["call"] for c in calls] == ["create_repo", "create_branch", "list_repo_files", "upload_folder"]
    assert {c["token"] for c in calls} == {"hf_saved_login_token"}
    assert {c["repo_id"] for c in calls} == {"my-org/resnet18-cskd"}
    assert calls[0]["private"] is True and calls[1]["branch"] == "v1" and calls[2]["revision"] == "v1"
    upload = calls[3]
    assert upload["revision"] == "v1"
    assert upload["files"] == {p.name: p.stat().st_size for p in out.iterdir()}, "the tested folder, as it is"
    assert upload["card"] == (out / "README.md").read_text()
    assert upload["delete_patterns"] == ["pytorch_model.bin"], (
        "an earlier upload's top-level .bin would shadow the safetensors; a subfolder's weights stay"
    )

    card = ModelCard.load(out / "README.md")
    assert "timm.create_model('hf-hub:my-org/resnet18-cskd@v1', pretrained=True)" in card.text
    assert "ORG/" not in card.content
    assert card.data.library_name == "timm" and card.data.model_name == "my-org/resnet18-cskd"
    measured = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert measured == {k: metrics[k] for k in ("top1_err", "top5_err", "ece", "nll")}
    ece_names = {r.metric_name for r in card.data.eval_results if r.metric_type == "ece"}
    assert ece_names == {"ECE, 15 bins (%)"} and "| ECE, 15 bins (%) | 3.5 |" in card.text, (
        "evaluate's --ece-bins"
    )
    assert {(r.dataset_name, r.dataset_split, r.task_type) for r in card.data.eval_results} == {
        ("fmnist100", "val", "image-classification")
    }


def test_push_to_hub_token_from_the_environment_and_a_failed_upload(
    tmp_path, hub_export, monkeypatch, capsys
):
    checkpoint, metrics_file, _ = hub_export
    no_login(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    record = tmp_path / "hub.json"
    fake_hub.install(record, patch=monkeypatch.setattr)
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"), "--push-to-hub", "me/m",
            "--dataset", "timm/fmnist"]  # fmt: skip
    assert export.main(argv) == 0
    calls = fake_hub.read(record)["calls"]
    assert [c["call"] for c in calls] == ["create_repo", "list_repo_files", "upload_folder"], "no branch"
    assert calls[0]["token"] == "hf_env_token"
    assert calls[0]["private"] is None, "without --private a new repository takes the owner's default"
    assert calls[1]["revision"] is None
    card = ModelCard.load(tmp_path / "o" / "README.md")
    assert "hf-hub:me/m'" in card.text
    capsys.readouterr()

    record.unlink()
    fake_hub.install(record, fail_upload=True, patch=monkeypatch.setattr)
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"), "--metrics", str(metrics_file),
            "--push-to-hub", "me/m"]  # fmt: skip
    assert export.main(argv) == 1
    captured = capsys.readouterr()
    assert "uploaded" not in captured.out
    assert captured.err.startswith("error: --push-to-hub me/m: the upload failed (HfHubHTTPError: ")
    assert "403 Forbidden" in captured.err and "Traceback" not in captured.err
    assert [c["call"] for c in fake_hub.read(record)["calls"]] == [
        "create_repo",
        "list_repo_files",
        "upload_folder",
    ]
    assert (tmp_path / "o" / "model.safetensors").is_file(), "the local export stays"


def test_card_ece_bins_come_from_where_the_metrics_were_measured():
    train_args = {"ece_bins": 10}
    assert export.ece_bins({"ece": 1.0, "ece_bins": 15, "checkpoint": "x"}, train_args) == 15
    # An evaluate metrics.json from before it recorded its bins used evaluate's default, not the run's.
    assert export.ece_bins({"ece": 1.0, "checkpoint": "x"}, train_args) == 20
    # A training run's summary.csv row was measured with the run's --ece-bins.
    assert export.ece_bins({"ece": 1.0}, train_args) == 10
