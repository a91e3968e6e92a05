"""benchmarks/gpu_check.py: its --smoke run (every row at toy sizes on CPU) and the parts that decide
a row's outcome (the sync counter, the preflight, the budget).

The GPU machine is lent rarely and briefly; this keeps the script it will run from rotting in between.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import cli, preflight  # noqa: E402
from gpu_check.syncs import SyncCounter, instrument  # noqa: E402

ROWS = [
    "bf16 CS-KD steps",
    "fp16 GradScaler",
    "channels_last",
    "DDP 1-process",
    "evaluate",
    "trainer SIGTERM + resume",
    "trainer host syncs",
    "loader vs GPU step",
    "trainer 2 ranks",
    "torch.compile",
    *[
        f"train {kind} {mode}"
        for kind in ("eager", "compiled")
        for mode in ("CE", "CS-KD anchor", "CS-KD paired")
    ],
    "loss 256x1000 bf16",
    "loss 1024x1000 bf16",
]
CHECKS = {name for name in ROWS if not name.startswith(("train ", "loss ", "loader "))}


def has_cxx_compiler() -> bool:
    cxx = os.environ.get("CXX")
    return bool((cxx and shutil.which(cxx)) or any(shutil.which(n) for n in ("g++", "c++", "clang++")))


def parse_table(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| row |"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def gpu_check(*args, timeout=1500):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# torch.compile's CPU code generation and seven trainer processes: minutes on 2 shared cores.
@pytest.mark.slow
def test_smoke_runs_every_row_and_the_trainer_rows_pass(tmp_path):
    proc = gpu_check("--smoke", "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert proc.stdout.count("| row | status |") == 1, "exactly one table"
    assert "CPU smoke run (not evidence)" in proc.stdout
    rows = parse_table(proc.stdout)
    assert list(rows) == ROWS, proc.stdout

    compiled = "SKIP" if not has_cxx_compiler() else None
    for name, (status, *_) in rows.items():
        expected = {"PASS"} if name in CHECKS else {"ok"}
        if "compile" in name:
            expected.add(compiled)
        assert status in expected, f"{name}: {rows[name]}"
    # What each row's PASS stands for, as the table states it.
    assert rows["fp16 GradScaler"][1] == "skipped CE/anchor/paired 0/0/0"
    assert rows["trainer SIGTERM + resume"][1].endswith("; resume exit 0, finished=True")
    assert "process group empty" in rows["trainer SIGTERM + resume"][2]
    assert rows["trainer host syncs"][1] == "0 outside log steps"
    assert rows["trainer 2 ranks"][1] == "weights identical on both ranks"

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["complete"] is True and not report["preflight"]["fatal"]
    by_name = {r["name"]: r for r in report["rows"]}
    assert list(by_name) == ROWS
    sigterm = by_name["trainer SIGTERM + resume"]["raw"]
    assert sigterm["exit"] == [0, 0] and 0 < sigterm["position"][1] < sigterm["steps"]
    # The proxy sees the fp16 GradScaler's found_inf read in every counted step: it does count.
    syncs = by_name["trainer host syncs"]["raw"]
    assert syncs["grad_scaler_in_steps"] == syncs["steps"] - syncs["warmup_steps"] > 0
    ranks = by_name["trainer 2 ranks"]["raw"]["results"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["sha256"] == ranks[1]["sha256"]
    loader = by_name["loader vs GPU step"]["raw"]
    assert loader["loader_images_per_s"] > 0 and loader["step_images"] == 8  # 4 anchors + 4 partners
    assert (tmp_path / "gpu_check.md").read_text().count("| row | status |") == 1
    assert "===== sigterm-run" in (tmp_path / "trainer_logs.txt").read_text()


class _FakeTrainer:
    """The Trainer's step loop in miniature: ``sync_in_step`` plants a host read in every step."""

    def __init__(self, sync_in_step: bool):
        self.sync_in_step = sync_in_step
        self.train_loader = [(torch.ones(2), torch.zeros(2)) for _ in range(6)]
        self.value = torch.zeros(())

    def _train_step(self, images, target, accum, update):
        self.value += images.sum()
        if self.sync_in_step:
            self.value.item()

    def _log_progress(self, *args):
        self.value.tolist()

    def _agree(self, stop, check_finite=True):
        return self.value.item() < 0 if check_finite else False

    def save(self):
        pass

    _save_mid_epoch = validate = sync_batchnorm_stats = save

    def fit(self, log_every=3):
        for i, (images, target) in enumerate(self.train_loader, 1):
            self._train_step(images, target, 1, True)
            self._agree(None, check_finite=False)
            if i % log_every == 0:
                self._log_progress()
                self._agree(None)
        self.value.tolist()  # the epoch's totals


@pytest.mark.parametrize("planted", [False, True])
def test_sync_counter_counts_host_reads_in_steps_and_not_at_log_steps(planted):
    trainer = _FakeTrainer(sync_in_step=planted)
    counter = SyncCounter(cuda=False)
    instrument(trainer, counter)
    with counter:
        trainer.fit()
    summary = counter.summary(warmup_steps=2)
    assert summary["steps"] == 6
    assert summary["in_steps"] == (4 if planted else 0)  # steps 3..6
    assert summary["at_log_steps"] == 4  # steps 3 and 6: the log's tolist and the agreement's item
    if planted:
        assert any("_train_step" in place for place in summary["places_in_steps"])
    # Leaving restores torch: the proxy's counting wrappers are gone.
    assert "item" not in vars(torch.Tensor) and torch.equal.__module__ != __name__


def test_preflight_names_a_too_old_timm_and_how_to_bring_one(monkeypatch, tmp_path):
    import timm

    monkeypatch.setattr(timm, "__version__", "0.9.16")
    monkeypatch.delattr(timm.utils, "ModelEmaV3")
    result = preflight.run_preflight("cpu", tmp_path, 0.0, 0.0)
    fatal = {item["name"]: item["text"] for item in result["fatal"]}
    assert list(fatal) == ["timm"]
    assert "needs timm>=1.0.29" in fatal["timm"] and "timm.utils.ModelEmaV3" in fatal["timm"]
    assert "pip download" in fatal["timm"] and "--no-index" in fatal["timm"]


def test_preflight_failure_stops_before_any_row(tmp_path, capsys):
    assert cli.main(["--smoke", "--min-disk-gib", "1e9", "--output", str(tmp_path)]) == 2
    assert "error: preflight failed: disk:" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.md").exists()


def test_a_row_that_no_longer_fits_the_budget_is_skipped_and_marked(tmp_path, capsys):
    assert cli.main(["--smoke", "--budget-s", "1", "--rows", "evaluate", "--output", str(tmp_path)]) == 0
    rows = parse_table(capsys.readouterr().out)
    assert list(rows) == ["evaluate"]
    assert rows["evaluate"][0] == "SKIP" and rows["evaluate"][2].startswith("budget: needs ~5 s")
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rows"][0]["status"] == "SKIP"


def test_sync_counter_on_cuda_records_torchs_sync_warnings_with_their_place(monkeypatch):
    """The CUDA path without a GPU: torch's sync debug mode reports each synchronising call as a
    UserWarning; here the step raises that warning itself, as torch would inside ``.item()``."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    trainer = _FakeTrainer(sync_in_step=False)
    step = trainer._train_step

    def warning_step(*args):
        step(*args)
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    trainer._train_step = warning_step
    counter = SyncCounter(cuda=True)
    instrument(trainer, counter)
    with counter:
        trainer.fit()
    assert modes == ["warn", 0], "the debug mode is on inside and restored after"
    summary = counter.summary(warmup_steps=2)
    assert summary["in_steps"] == 4 and summary["at_log_steps"] == 0
    assert all("warning_step" in place for place in summary["places_in_steps"])
