"""A cell's record and lock: ``cell.json`` holds the settings a cell was run with and its status, so a
rerun of the study skips a finished cell, resumes an interrupted one and refuses one whose settings
changed; the cell's ``RunLock`` keeps a second study out while one runs in it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time

import yaml

from timm_cskd.atomic import write_atomic
from timm_cskd.run_lock import RunLock
from timm_cskd.study.errors import StudyError
from timm_cskd.study.plan import Cell, Study

__all__ = [
    "CELL_RECORD",
    "EVAL_LOG",
    "INCOMPLETE",
    "TRAIN_LOG",
    "begin",
    "cell_state",
    "check_study",
    "claim_cell",
    "locked",
    "read_record",
    "recorded_seconds",
    "write_record",
]

CELL_RECORD = "cell.json"
TRAIN_LOG, EVAL_LOG = "train.log", "eval.log"
# A cell.json still "running" outside a run is one whose study was killed.
INCOMPLETE = {"running": "running, or its study was killed"}


def read_record(cell: Cell) -> dict | None:
    path = cell.dir / CELL_RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StudyError(f"cell {cell.name}: cannot read {path}: {e}") from e


def write_record(cell: Cell, record: dict) -> None:
    write_atomic(cell.dir / CELL_RECORD, json.dumps(record, indent=2))


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in dict.fromkeys([*old, *new])
            for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def cell_state(cell: Cell) -> tuple[str, str]:
    """``(state, detail)``: ``new``, ``done`` (evaluated with these settings), ``partial`` (to resume),
    ``changed`` (run with other settings) or ``unrecorded`` (a run the study did not record)."""
    record = read_record(cell)
    if record is None:
        held = [p.name for p in (cell.train_dir, cell.eval_dir) if p.exists()]
        if held:
            return "unrecorded", f"holds {', '.join(held)} but no {CELL_RECORD}"
        return "new", ""
    changes = _differences(record.get("settings"), cell.settings)
    if changes:
        return "changed", "; ".join(changes)
    if record.get("status") == "done" and (cell.eval_dir / "metrics.json").is_file():
        return "done", ""
    return "partial", record.get("status", "")


def check_study(study: Study, overwrite: bool = False) -> dict[Cell, str]:
    """Every cell's state; raises naming each cell whose settings changed, unless ``overwrite``."""
    states, refused = {}, []
    for cell in study.cells:
        state, detail = cell_state(cell)
        states[cell] = state
        if state in ("changed", "unrecorded") and not overwrite:
            refused.append(f"  {cell.name} ({cell.dir}): {detail}")
    if refused:
        raise StudyError(
            f"{len(refused)} cell(s) in {study.output} were run with other settings:\n" + "\n".join(refused)
            + "\npass --overwrite to run them again from scratch, or choose another --output"
        )  # fmt: skip
    return states


@contextlib.contextmanager
def locked(cell: Cell):
    """The cell's lock for the life of a run in it: a second study meets ``RunLockedError``."""
    cell.dir.mkdir(parents=True, exist_ok=True)
    with RunLock(cell.dir):
        yield


def begin(cell: Cell, fresh: bool) -> dict:
    """Write the cell's ``trainer.yaml`` and its settings in ``cell.json`` (status ``running``) before
    anything runs in it. ``fresh`` (a rerun of changed settings) first drops the old evaluation and logs;
    the trainer's ``--overwrite`` drops its checkpoints under the trainer's own lock."""
    if fresh:
        shutil.rmtree(cell.eval_dir, ignore_errors=True)
        for name in (TRAIN_LOG, EVAL_LOG):
            (cell.dir / name).unlink(missing_ok=True)
    if cell.trainer_config_file is not None:
        write_atomic(
            cell.trainer_config_file, yaml.safe_dump(cell.settings["trainer_config"], sort_keys=False)
        )
    record = {
        "settings": cell.settings,
        "label": cell.row.label,
        "status": "running",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_record(cell, record)
    return record


@contextlib.contextmanager
def claim_cell(cell: Cell, fresh: bool = False):
    """Hold the cell (its lock) with its settings recorded, as the study does around a run in it; yields
    the record (``cell.json``'s content)."""
    with locked(cell):
        yield begin(cell, fresh)


def recorded_seconds(cell: Cell) -> float | None:
    """A done cell's recorded run time (for the ETA), else None."""
    record = read_record(cell) or {}
    return record.get("seconds") if record.get("status") == "done" else None
