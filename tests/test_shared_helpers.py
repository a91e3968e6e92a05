"""The helpers the trainer, checkpoints and studies share: atomic writes, the stop flag, names."""

import datetime
import os
import signal
import subprocess
import sys

import pytest

from timm_cskd.atomic import atomic_path, write_atomic
from timm_cskd.naming import format_duration, slug
from timm_cskd.stop_flag import StopFlag


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "status.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["status.json"]


@pytest.mark.parametrize("seconds", [0, 59.9, 61, 3599, 3600, 3725.4, 86399, -5])
def test_durations_are_hours_minutes_seconds(seconds):
    assert format_duration(seconds) == str(datetime.timedelta(seconds=max(int(seconds), 0)))


def test_durations_past_a_day_count_hours():
    assert format_duration(100 * 3600 + 61) == "100:01:01"


def test_a_label_keeps_its_study_folder_name():
    # Studies find their cells again by these names: the names of existing study folders.
    assert slug("cskd (temperature=1, lambda=1)") == "cskd_temperature=1_lambda=1"
    assert slug("CS-KD + LS") == "CS-KD_+_LS"
    assert slug("a__b/c") == "a_b_c" and slug("()") == "_"


def test_sigterm_sets_the_flag_reaches_the_child_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        stop.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.child.wait(timeout=30) == -signal.SIGTERM
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_requested_while_the_child_starts_still_reaches_it():
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        stop.watch(child)
        assert child.wait(timeout=30) == -signal.SIGTERM


def test_a_failed_checkpoint_save_keeps_last_in_place(tmp_path, monkeypatch):
    """A quota error that a network file system reports only at fsync: last.pth.tar stays readable."""
    import torch

    from timm_cskd.checkpoint import load_checkpoint_file, save_checkpoint

    last = tmp_path / "last.pth.tar"
    save_checkpoint({"epoch": 1}, last, keep_previous=True)

    def quota_exceeded(fd):
        raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", quota_exceeded)
    with pytest.raises(OSError, match="quota"):
        save_checkpoint({"epoch": 2, "weights": torch.zeros(4)}, last, keep_previous=True)
    assert load_checkpoint_file(last)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"], "no temporary file left behind"


def test_summary_rows_line_up_with_the_header_when_a_resumed_run_logs_other_columns(tmp_path):
    """timm's update_summary writes by position: a resumed run with the method's terms (or a teacher)
    would shift every later value. Checked by reading the file back by column name."""
    import csv

    from timm_cskd.train.records import append_summary_row

    path = tmp_path / "summary.csv"
    old = {"loss": 2.0, "ce": 1.5, "reg": 0.5, "img_per_sec": 100.0}
    append_summary_row(path, 0, old, {"nll": 1.25, "top1_err": 40.0}, lr=0.1)
    new = {"loss": 1.0, "ce": 0.75, "reg": 0.25, "kl": 0.0625, "img_per_sec": 110.0}
    append_summary_row(path, 1, new, {"nll": 0.5, "top1_err": 20.0}, lr=0.01)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert rows[0]["train_kl"] == "" and float(rows[1]["train_kl"]) == 0.0625
    assert float(rows[1]["train_img_per_sec"]) == 110.0 and float(rows[1]["eval_nll"]) == 0.5
    assert float(rows[1]["lr"]) == 0.01 and float(rows[0]["eval_top1_err"]) == 40.0
    assert None not in rows[1], "no value without a column"
