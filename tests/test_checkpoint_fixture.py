"""A checkpoint written by an earlier release (tests/fixtures/checkpoint_release2, its README says how) still
resumes, evaluates and exports, and a checkpoint from a newer release is refused by name."""

import csv
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch

from timm_cskd import evaluate, export
from timm_cskd.checkpoint import CONFIG_VERSION, CheckpointError, load_checkpoint_file, load_model
from timm_cskd.train import main as train_main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_release2"
# The fixture's bytes: a regenerated one would check the format of the code that regenerated it.
FIXTURE_SHA256 = {
    "run/last.pth.tar": "0494706a5484052e22a3be43d2e75eb21745b0873744fa18bb216c11af28bc89",
    "run/args.yaml": "7cb5084b1685506db8e6543c3f83a815776173f302451b75b76bd84e8a26c806",
}


@pytest.fixture
def release2(tmp_path):
    """A copy of the fixture: runs resumed from it write into their folder, the committed files stay as
    they are."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "release2"))


def _summary(run_dir):
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_fixture_is_the_old_format_and_was_not_regenerated():
    for name, digest in FIXTURE_SHA256.items():
        assert hashlib.sha256((FIXTURE / name).read_bytes()).hexdigest() == digest, name
    checkpoint = load_checkpoint_file(FIXTURE / "run" / "last.pth.tar")
    assert "config_version" not in checkpoint
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["method"] == "cskd"
    # Paths of the machine that wrote it: the rows below pass their own.
    assert checkpoint["args"]["data_dir"] == "/tmp/cskd_release2/data"


def test_resume_continues_the_old_run_for_one_more_epoch(release2, capsys):
    run_dir = release2 / "run"
    before = (run_dir / "summary.csv").read_text().splitlines()
    saved = load_checkpoint_file(run_dir / "last.pth.tar")
    argv = ["-c", str(run_dir / "args.yaml"), "--data-dir", str(release2 / "data"), "--output", str(release2),
            "--experiment", "run", "--resume", "auto", "--epochs", "3", "--log-interval", "1"]  # fmt: skip
    assert train_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"resumed from {run_dir / 'last.pth.tar'} at epoch 2, batch 0 (step 12)" in out
    assert "epoch 1/3" not in out and "epoch 2/3" not in out
    # Trained on from the saved weights: an untrained model's loss on 4 classes is about ln 4.
    first_loss = float(re.search(r"epoch 3/3  batch 1/6 .*? loss ([0-9.]+)", out).group(1))
    assert first_loss < 0.25 * math.log(4)

    after = (run_dir / "summary.csv").read_text().splitlines()
    assert after[: len(before)] == before, "the old epochs' rows stay as they were"
    rows = _summary(run_dir)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    # Cosine rebuilt for 3 epochs (--epochs changed), at epoch 2 of it: 0.05 * (1 + cos(2 pi / 3)) / 2.
    assert float(rows[2]["lr"]) == pytest.approx(0.05 * (1 + math.cos(2 * math.pi / 3)) / 2)

    resumed = load_checkpoint_file(run_dir / "last.pth.tar")
    assert (resumed["epoch"], resumed["resume_epoch"], resumed["global_step"]) == (2, 3, 18)
    assert resumed["config_version"] == CONFIG_VERSION and resumed["args"]["epochs"] == 3
    assert resumed["args"]["data_dir"] == str(release2 / "data")
    assert not torch.equal(resumed["state_dict"]["fc.weight"], saved["state_dict"]["fc.weight"])


def test_evaluate_gives_the_old_runs_validation(release2, tmp_path):
    run_dir = release2 / "run"
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(run_dir / "last.pth.tar"), "--data-dir", str(release2 / "data"),
            "--output", str(out), "-j", "0"]  # fmt: skip
    assert evaluate.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    checkpoint = load_checkpoint_file(run_dir / "last.pth.tar")
    # One validation image per class is filed under the next class (the fixture's README): 4 of 20 wrong.
    assert metrics["num_samples"] == 20
    assert metrics["top1_err"] == pytest.approx(20.0)
    assert metrics["top1_err"] == pytest.approx(100.0 - checkpoint["metric"])  # the best top-1 it saved
    last = _summary(run_dir)[-1]
    for key in ("top1_err", "top5_err", "nll", "ece"):
        assert metrics[key] == pytest.approx(float(last[f"eval_{key}"]), rel=1e-5, abs=1e-6), key


def test_export_loads_in_timm_with_the_checkpoints_logits(release2, tmp_path):
    checkpoint = load_checkpoint_file(release2 / "run" / "last.pth.tar")
    out = tmp_path / "exported"
    assert export.main(["--checkpoint", str(release2 / "run" / "last.pth.tar"), "--output", str(out)]) == 0
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    # The checkpoint's weights in a plain timm model, without the project's loader.
    reference = timm.create_model(checkpoint["arch"], num_classes=checkpoint["num_classes"])
    reference.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference.eval()(x), rtol=0, atol=0)
    assert loaded.pretrained_cfg["label_names"] == checkpoint["class_names"]
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert "| method | cskd |" in (out / "README.md").read_text()


def test_a_checkpoint_from_a_newer_release_is_refused_by_name(release2, tmp_path, capsys):
    run_dir = release2 / "run"
    old = run_dir / "last.pth.tar"
    checkpoint = load_checkpoint_file(old)
    newer = {**checkpoint, "config_version": CONFIG_VERSION + 1, "resume_epoch": 3}
    # The newer run's checkpoint as last.pth.tar, the fixture's beside it: neither resumed silently.
    shutil.copyfile(old, run_dir / "last-previous.pth.tar")
    torch.save(newer, old)
    message = f"{old} was written by a newer timm-cskd (config_version {CONFIG_VERSION + 1}"

    with pytest.raises(CheckpointError, match="config_version") as e:
        load_model(old)
    assert str(e.value).startswith(message)
    capsys.readouterr()
    eval_argv = ["--checkpoint", str(old), "--data-dir", str(release2 / "data"),
                 "--output", str(tmp_path / "e")]  # fmt: skip
    assert evaluate.main(eval_argv) == 2
    assert message in capsys.readouterr().err
    assert export.main(["--checkpoint", str(old), "--output", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    common = ["-c", str(run_dir / "args.yaml"), "--data-dir", str(release2 / "data"), "--output", str(release2),
              "--experiment", "run", "--epochs", "4"]  # fmt: skip
    for resume in ("auto", str(old)):
        assert train_main([*common, "--resume", resume]) == 2
        assert message in capsys.readouterr().err
    assert torch.load(old, weights_only=True)["config_version"] == CONFIG_VERSION + 1, "left as it was"
    assert (run_dir / "summary.csv").read_bytes() == (FIXTURE / "run" / "summary.csv").read_bytes()
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()

    torch.save({**checkpoint, "config_version": "2"}, tmp_path / "odd.pth.tar")
    with pytest.raises(CheckpointError, match="odd.pth.tar: config_version '2' is not a positive integer"):
        load_model(tmp_path / "odd.pth.tar")
