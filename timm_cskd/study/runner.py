"""Running a study: each cell's trainer and evaluation as subprocesses (output appended to the cell's
logs), holding the cell's lock; SIGTERM passed on to the running trainer, which saves and exits, after
which nothing more starts; progress with an ETA from the cells' mean run time; ``--dry-run``'s plan."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from timm_cskd.figures import FiguresError, figures_for_study
from timm_cskd.naming import format_duration
from timm_cskd.run_lock import RunLock, RunLockedError
from timm_cskd.stop_flag import StopFlag
from timm_cskd.study.cells import (
    EVAL_LOG,
    TRAIN_LOG,
    begin,
    cell_state,
    check_study,
    locked,
    recorded_seconds,
    write_record,
)
from timm_cskd.study.plan import TRAINER_CONFIG, Cell, Study
from timm_cskd.study.summary import summarise

__all__ = ["CellResult", "StudyReport", "print_plan", "run_cell", "run_study"]

LOG_TAIL_LINES = 20


@dataclass
class CellResult:
    """``status``: done, skipped (done before), failed, interrupted, busy or refused."""

    status: str
    seconds: float = 0.0
    message: str = ""
    log: Path | None = None
    log_tail: list[str] = field(default_factory=list)


def _run_logged(command: list[str], log: Path, stop: StopFlag) -> int:
    """Run ``command`` with its output appended to ``log`` (a resumed cell keeps its earlier attempts)."""
    # torchrun SIGKILLs its workers 30 s after passing on a SIGTERM unless told to wait: a trainer needs
    # up to --log-interval updates to notice, then a checkpoint save.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300")
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        f.flush()
        with subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env) as child:
            stop.watch(child)
            try:
                return child.wait()
            finally:
                stop.watch(None)


def _log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(log, "rb") as f:
            f.seek(max(f.seek(0, io.SEEK_END) - 65536, 0))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


def _trained_to_the_end(cell: Cell) -> bool:
    """Whether the trainer finished its last epoch (it also exits 0 after saving on SIGTERM), as its
    status.json says: the schedule's epoch count, cooldown and warmup prefix included."""
    try:
        return bool(json.loads((cell.train_dir / "status.json").read_text())["finished"])
    except (OSError, KeyError, ValueError):
        return False


def _stopped(cell: Cell, record: dict, stage: str, code: int, log: Path, interrupted: bool, start: float):
    record.update(status="interrupted" if interrupted else "failed", stage=stage, exit_code=code)
    record["log_tail"] = _log_tail(log)
    write_record(cell, record)
    message = (
        f"stopped during {stage}; the next run resumes it" if interrupted
        else f"{stage} failed with exit code {code}"
    )  # fmt: skip
    return CellResult(record["status"], time.monotonic() - start, message, log, record["log_tail"])


def run_cell(cell: Cell, *, overwrite: bool = False, stop: StopFlag | None = None) -> CellResult:
    """Train (resuming what the cell holds) and evaluate one cell, holding its lock throughout."""
    stop = stop or StopFlag()
    start = time.monotonic()
    try:
        with locked(cell):
            # The state again under the lock: another study may have finished or changed the cell since.
            state, detail = cell_state(cell)
            if state == "done":
                return CellResult("skipped", message="finished by another run")
            fresh = state in ("changed", "unrecorded")
            if fresh and not overwrite:
                return CellResult("refused", message=f"{detail}; pass --overwrite to run it again")
            if cell.train_dir.exists():
                # A trainer that outlived a killed study still holds its folder: report it before starting.
                with RunLock(cell.train_dir):
                    pass
            record = begin(cell, fresh)
            train_log, eval_log = cell.dir / TRAIN_LOG, cell.dir / EVAL_LOG
            code = _run_logged(cell.train_command(fresh), train_log, stop)
            record["train_seconds"] = round(time.monotonic() - start, 1)
            # The trainer also exits 0 when SIGTERM stopped it after a checkpoint.
            if code != 0 or stop.requested or not _trained_to_the_end(cell):
                return _stopped(cell, record, "train", code, train_log, code == 0 or stop.requested, start)
            shutil.rmtree(cell.eval_dir, ignore_errors=True)  # no stale file outlives a failed evaluation
            code = _run_logged(cell.eval_command(), eval_log, stop)
            if code != 0:
                return _stopped(cell, record, "eval", code, eval_log, stop.requested, start)
            seconds = time.monotonic() - start
            record.update(
                status="done", seconds=round(seconds, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S")
            )
            record["eval_seconds"] = round(seconds - record["train_seconds"], 1)
            write_record(cell, record)
            return CellResult("done", seconds)
    except RunLockedError as e:
        return CellResult("busy", message=str(e))


# ---------------------------------------------------------------------------------------------- study


@dataclass
class StudyReport:
    """Each cell's result (cells a SIGTERM left unstarted have none), the files written, other errors."""

    cells: list[Cell]
    results: dict[Cell, CellResult]
    written: list[Path]
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        complete = all(
            c in self.results and self.results[c].status in ("done", "skipped") for c in self.cells
        )
        return 0 if complete and not self.errors else 1


def _notes(study: Study) -> list[str]:
    if study.calib_split is None:
        return []
    lacking = sorted({c.dataset for c in study.cells if c.calib_split is None})
    return [
        f"note: dataset '{d}' has no '{study.calib_split}' split: evaluated without temperature scaling"
        for d in lacking
    ]


def print_plan(study: Study, overwrite: bool = False) -> None:
    """``--dry-run``: every cell's state and the exact commands a run would start."""
    states = check_study(study, overwrite)
    shape = f"{len(study.rows)} rows x {len(study.datasets)} dataset(s) x {len(study.seeds)} seed(s)"
    print(f"study {study.output}: {len(study.cells)} cells ({shape})")
    for line in _notes(study):
        print(line)
    for i, cell in enumerate(study.cells, 1):
        state = states[cell]
        print(f"\n[{i}/{len(study.cells)}] {cell.name}: {state}")
        if state == "done":
            print("    finished with these settings: skipped")
            continue
        fresh = state in ("changed", "unrecorded")
        if study.base_config is not None:
            print(f"    {cell.dir / TRAINER_CONFIG}: {study.base_config} without the keys set per cell")
        print(f"    train: {shlex.join(cell.train_command(fresh))}")
        print(f"    eval:  {shlex.join(cell.eval_command())}")


def run_study(study: Study, *, overwrite: bool = False, figures: bool = False) -> StudyReport:
    """Run every cell not yet done, in order, then write the summaries (and ``figures``)."""
    states = check_study(study, overwrite)
    total = len(study.cells)
    results: dict[Cell, CellResult] = {}
    durations = [s for s in map(recorded_seconds, study.cells) if s]
    done = sum(state == "done" for state in states.values())
    print(f"study {study.output}: {total} cells, {done} done, {total - done} to run", flush=True)
    for line in _notes(study):
        print(line, flush=True)
    with StopFlag() as stop:
        for cell in study.cells:
            if states[cell] == "done":
                results[cell] = CellResult("skipped")
                continue
            if stop.requested:
                break
            print(f"[{done}/{total}] {cell.name}: running (logs in {cell.dir})", flush=True)
            result = results[cell] = run_cell(cell, overwrite=overwrite, stop=stop)
            if result.status in ("done", "skipped"):
                done += 1
                durations += [result.seconds] if result.status == "done" else []
            to_run = sum(1 for c in study.cells if c not in results and states[c] != "done")
            eta = (
                f", ETA {format_duration(np.mean(durations) * to_run)} for {to_run} cell(s)"
                if durations and to_run
                else ""
            )
            detail = f" in {format_duration(result.seconds)}" if result.seconds else ""
            print(f"[{done}/{total}] {cell.name}: {result.status}{detail}{eta}", flush=True)
            if result.message:
                print(f"    {result.message}", flush=True)
            if result.log is not None and result.status == "failed":
                print(f"    last lines of {result.log}:", flush=True)
                for line in result.log_tail:
                    print(f"    | {line}", flush=True)
    report = StudyReport(study.cells, results, summarise(study))
    if figures and not stop.requested:
        try:
            report.written += figures_for_study(study.output, study.output / "figures")
        except (FiguresError, ImportError) as e:
            report.errors.append(f"figures: {e}")
    unfinished = {c: r for c, r in results.items() if r.status not in ("done", "skipped")}
    not_started = total - len(results)
    print(f"\nstudy {study.output}: {done}/{total} cells done", flush=True)
    for cell, result in unfinished.items():
        print(f"  {result.status}: {cell.name} ({cell.dir})", flush=True)
    if not_started:
        print(f"  {not_started} cell(s) not started: stopped by SIGTERM", flush=True)
    for error in report.errors:
        print(f"  error: {error}", flush=True)
    print("  " + ", ".join(str(p) for p in report.written if p.parent == study.output), flush=True)
    return report
