"""Studies: the paper's tables for your data. A grid of datasets x methods x seeds (plus hyper-parameter
sweeps), each cell an ordinary ``timm-cskd train`` run (``python -m timm_cskd.train``) evaluated by
``timm_cskd.evaluate``.

    python -m timm_cskd.study -c configs/demo.yaml --data-dir data/fmnist100 --methods ce cskd \\
        --seeds 0 1 2 --output output/studies/fmnist -- --epochs 40
    python -m timm_cskd.study --grid configs/study_fashion_mnist.yaml [--dry-run] [--figures]

Everything after ``--`` goes to every trainer run. A ``--methods`` entry is a method name with optional
hyper-parameters, ``cskd:temperature=1,lambda=2``; ``--sweep cskd temperature=1,4 lambda=1,2,3,4`` adds
one row per combination. A ``--grid`` YAML file holds the same (flags override its entries):

    base_config: demo                       # a packaged config's name, or a path relative to the current folder
    output: output/studies/fmnist
    datasets: {fmnist100: data/fmnist100}   # name: data dir (or a list of dirs, named by their folder)
    seeds: [0, 1, 2]
    methods: [ce, {name: cskd, label: CS-KD, kwargs: {temperature: 4, lambda: 1}}]
    sweep: {method: cskd, temperature: [1, 4], lambda: [1, 2, 3, 4]}   # or a list of such mappings
    trainer_args: [--epochs, 40]
    eval_args: [-j, 2]                      # to every timm_cskd.evaluate run
    calib_split: calib                      # temperature scaling where the dataset has this split
    nproc_per_node: 1                       # > 1: the trainer runs under torchrun (--standalone)
    eval_checkpoint: last                   # or best (model_best.pth.tar)
    baseline: CE                            # the row differences are taken against (default: the first)

Each cell lives in ``<output>/<dataset>/<label>/seed<k>/``: ``cell.json`` (its settings and status),
``trainer.yaml`` (the base config without the keys the study sets per cell), ``train/`` (the trainer's
experiment folder), ``eval/`` (``metrics.json``, ``reliability.json``, ``predictions.npz``) and the logs
``train.log`` / ``eval.log``. A finished cell is skipped, an interrupted one resumes (``--resume auto``), one
whose settings changed is refused unless ``--overwrite``, a failed one is reported and the others go on.
The study writes ``study.json`` (for ``timm_cskd.figures``), ``study.md`` (the paper's tables, mean ±
sample std over seeds; differences from the baseline with Welch's t; the calibration regime in words, as
``timm_cskd.study_report`` writes them from a study folder), ``study.csv`` (one row per run and metric),
``results.csv`` (timm validate.py's results columns, one row per run) and ``reliability_<dataset>.png``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import difflib
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from timm_cskd import evaluate
from timm_cskd.config import build_parser as trainer_parser
from timm_cskd.config import load_yaml_defaults, resolve_config
from timm_cskd.data.index import find_split
from timm_cskd.errors import ConfigError
from timm_cskd.figures import FiguresError, figures_for_study
from timm_cskd.methods import LEGACY_KWARGS, get_method, method_hparams
from timm_cskd.reliability import load_bins, plot_reliability_overlay
from timm_cskd.results import TIMM_COLUMNS, results_row, write_results
from timm_cskd.run_lock import RunLock, RunLockedError
from timm_cskd.study_report import analysis_lines
from timm_cskd.study_tables import dataset_table

__all__ = [
    "Cell",
    "CellResult",
    "Row",
    "Study",
    "StudyError",
    "StudyReport",
    "cell_state",
    "check_study",
    "claim_cell",
    "dataset_table",
    "load_grid",
    "main",
    "parse_method_spec",
    "plan_study",
    "print_plan",
    "run_cell",
    "run_study",
    "summarise",
]

# The trainer as a module of the installed package (what train_imagenet.py and `timm-cskd train` run).
TRAINER_MODULE = ["-m", "timm_cskd.train"]
CELL_RECORD = "cell.json"
RESULTS_FILE = "results.csv"
TRAINER_CONFIG = "trainer.yaml"
TRAIN_DIR, EVAL_DIR = "train", "eval"
TRAIN_LOG, EVAL_LOG = "train.log", "eval.log"
LOG_TAIL_LINES = 20
CHECKPOINTS = {"last": "last.pth.tar", "best": "model_best.pth.tar"}
GRID_KEYS = (
    "output",
    "base_config",
    "datasets",
    "methods",
    "seeds",
    "sweep",
    "trainer_args",
    "eval_args",
    "calib_split",
    "nproc_per_node",
    "eval_checkpoint",
    "baseline",
)
# Trainer options the study sets per cell, with where a study sets them: a base config's values for them
# are dropped (its method keys become defaults for the rows whose method has them), and trainer arguments
# may not set them.
TRAINER_OWNED = {
    "config": "-c",
    "data": "--data-dir",  # timm's deprecated positional data dir
    "data_dir": "--data-dir",
    "method": "--methods",
    "method_kwargs": "--methods",
    "cskd_mode": "--methods",
    "cskd_temperature": "--methods",
    "cskd_lambda": "--methods",
    "list_methods": "timm-cskd train --list-methods",
    "seed": "--seeds",
    "output": "--output",
    "experiment": "--output",
    "resume": "a rerun of the study",
    "overwrite": "--overwrite",
}
EVAL_OWNED = {
    "checkpoint": "--eval-checkpoint",
    "data_dir": "--data-dir",
    "output": "--output",
    "calib_split": "--calib-split",
}
# A cell.json still "running" outside a run is one whose study was killed.
INCOMPLETE = {"running": "running, or its study was killed"}


class StudyError(ConfigError):
    """The study cannot run as described; the message names the file, flag or cell at fault."""


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Row:
    """A table row: a method with its full hyper-parameters, under a unique label."""

    label: str
    method: str
    kwargs: dict


@dataclass(frozen=True, eq=False)
class Cell:
    """One run: a row on one dataset with one seed. ``settings`` decide its result and go in cell.json."""

    dataset: str
    data_dir: Path
    row: Row
    seed: int
    dir: Path
    calib_split: str | None
    settings: dict
    trainer_config_file: Path | None
    launcher: tuple[str, ...]
    trainer_argv: tuple[str, ...]
    eval_argv: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.dataset} / {self.row.label} / seed {self.seed}"

    @property
    def train_dir(self) -> Path:
        return self.dir / TRAIN_DIR

    @property
    def eval_dir(self) -> Path:
        return self.dir / EVAL_DIR

    def trainer_arguments(self, fresh: bool = False) -> list[str]:
        """``train_imagenet.py``'s arguments: resume what the cell holds, or start over (``fresh``)."""
        return [*self.trainer_argv, *(["--overwrite"] if fresh else ["--resume", "auto"])]

    def train_command(self, fresh: bool = False) -> list[str]:
        return [*self.launcher, *self.trainer_arguments(fresh)]

    def eval_command(self) -> list[str]:
        return list(self.eval_argv)


@dataclass(frozen=True)
class Study:
    """The planned grid: its rows and cells (for each dataset, for each seed, every row)."""

    output: Path
    datasets: dict[str, Path]
    rows: list[Row]
    seeds: list[int]
    base_config: Path | None
    trainer_args: list[str]
    eval_args: list[str]
    calib_split: str | None
    cells: list[Cell]
    baseline: str | None = None  # the label of the row differences are taken against (None: the first)


def _literal(text: str):
    """A command-line value as timm's ParseKwargs (the trainer's --method-kwargs) reads it."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``cskd:temperature=1,lambda=2`` -> ``("cskd", {"temperature": 1, "lambda": 2})``."""
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudyError(f"method entry '{spec}': expected METHOD[:KEY=VALUE,...], got '{item}'")
        kwargs[key.strip()] = _literal(value.strip())
    if not name:
        raise StudyError(f"method entry '{spec}' names no method")
    return name.strip(), kwargs


def _label(name: str, kwargs: dict) -> str:
    return f"{name} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_") or "_"


def _row(method: str, given: dict, label: str | None, base_kwargs: dict, where: str) -> Row:
    try:
        cls = get_method(method)
        defaults = {k: v for k, v in base_kwargs.items() if k in cls.hparams}
        kwargs = method_hparams(cls, {**defaults, **given})
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from e
    return Row(label or _label(method, given), method, kwargs)


def _method_rows(entries, base_kwargs: dict) -> list[Row]:
    rows = []
    for i, entry in enumerate(entries, 1):
        where = f"methods entry {i}"
        if isinstance(entry, str):
            name, given = parse_method_spec(entry)
            rows.append(_row(name, given, None, base_kwargs, f"{where} '{entry}'"))
            continue
        if not isinstance(entry, dict) or "name" not in entry:
            raise StudyError(
                f"{where}: expected 'METHOD[:KEY=VALUE,...]' or {{name, label, kwargs}}, got {entry!r}"
            )
        unknown = set(entry) - {"name", "label", "kwargs"}
        if unknown:
            raise StudyError(f"{where}: unknown keys {sorted(unknown)} (valid: name, label, kwargs)")
        given = entry.get("kwargs") or {}
        if not isinstance(given, dict):
            raise StudyError(f"{where}: kwargs must be a mapping, got {given!r}")
        rows.append(
            _row(str(entry["name"]), given, entry.get("label"), base_kwargs, f"{where} ({entry['name']})")
        )
    return rows


def _sweep_rows(sweeps, base_kwargs: dict) -> list[Row]:
    """Each sweep ``{method, label?, kwargs?, KEY: [values], ...}``: one row per combination of the
    listed values, labelled ``label (KEY=value, ...)``."""
    rows = []
    for i, sweep in enumerate([sweeps] if isinstance(sweeps, dict) else sweeps, 1):
        if not isinstance(sweep, dict) or "method" not in sweep:
            raise StudyError(f"sweep {i}: expected {{method: NAME, KEY: [values], ...}}, got {sweep!r}")
        method, fixed = str(sweep["method"]), sweep.get("kwargs") or {}
        swept = {
            k: v if isinstance(v, list) else [v]
            for k, v in sweep.items()
            if k not in ("method", "label", "kwargs")
        }
        if not swept or any(not values for values in swept.values()):
            raise StudyError(f"sweep {i} ({method}): list the values of at least one hyper-parameter")
        prefix = str(sweep.get("label", method))
        for values in itertools.product(*swept.values()):
            given = dict(zip(swept, values))
            rows.append(
                _row(method, {**fixed, **given}, _label(prefix, given), base_kwargs, f"sweep {i} ({method})")
            )
    return rows


def _datasets(datasets) -> dict[str, Path]:
    """``{name: dir}``, or a list of ``DIR`` / ``NAME=DIR`` entries (named by their folder by default)."""
    if isinstance(datasets, dict):
        pairs = [(str(k), str(v)) for k, v in datasets.items()]
    else:
        pairs = []
        for entry in [datasets] if isinstance(datasets, str | os.PathLike) else datasets:
            name, sep, folder = str(entry).partition("=")
            pairs.append((name, folder) if sep else (Path(entry).resolve().name, str(entry)))
    result = {}
    for name, folder in pairs:
        path = Path(folder).expanduser().resolve()
        if name in result:
            raise StudyError(f"dataset '{name}' is listed twice: name them, e.g. --data-dir {name}2={folder}")
        if not path.is_dir():
            raise StudyError(f"dataset '{name}': data dir {folder} does not exist or is not a folder")
        result[name] = path
    if not result:
        raise StudyError("no datasets: pass --data-dir DIR or list datasets in the grid file")
    return result


_UNSET = object()
_PLACEHOLDER = "\0"  # the value of the options a tool requires, which the study fills in per cell


def _check_passthrough(parser, argv: list[str], owned: dict, required: list[str], what: str) -> None:
    """Parse ``argv`` as the tool will: an unknown option, or one the study sets per cell (even to its
    default), is an error now rather than in every cell."""
    parser.exit_on_error = False
    parser.set_defaults(**dict.fromkeys(owned, _UNSET))
    try:
        given, unknown = parser.parse_known_args(
            [*(a for flag in required for a in (flag, _PLACEHOLDER)), *argv]
        )
    except argparse.ArgumentError as e:
        raise StudyError(f"{what} {shlex.join(argv)}: {e}") from e
    if unknown:
        raise StudyError(f"{what}: unknown arguments {shlex.join(unknown)}")
    for dest, instead in owned.items():
        if getattr(given, dest) not in (_UNSET, _PLACEHOLDER):
            flag = "--" + dest.replace("_", "-")
            raise StudyError(f"{what} set {flag}, which the study sets per cell (instead: {instead})")


def _trainer_config(base_config) -> tuple[dict, dict]:
    """The base config without the study's keys, and its method hyper-parameters (defaults for the rows
    whose method has them)."""
    if base_config is None:
        return {}, {}
    try:
        config = load_yaml_defaults(base_config, trainer_parser())
    except ConfigError as e:
        raise StudyError(f"base config: {e}") from e
    base_kwargs = dict(config.get("method_kwargs") or {})
    for flag, key in LEGACY_KWARGS.items():
        if config.get(flag) is not None:
            base_kwargs.setdefault(key, config[flag])
    return {k: v for k, v in config.items() if k not in TRAINER_OWNED}, base_kwargs


def _json_normal(value):
    """What a value reads back as from cell.json, so recorded and planned settings compare equal."""
    return json.loads(json.dumps(value))


def plan_study(
    output,
    datasets,
    methods=(),
    seeds=(0,),
    *,
    sweep=(),
    base_config=None,
    trainer_args=(),
    eval_args=(),
    calib_split: str | None = None,
    nproc_per_node: int = 1,
    eval_checkpoint: str = "last",
    baseline: str | None = None,
) -> Study:
    """The study's rows and cells with their exact commands; checks everything it can without running.

    ``methods`` are ``METHOD[:KEY=VALUE,...]`` strings or ``{name, label, kwargs}`` mappings, ``sweep`` a
    mapping or list of them (``{method, label?, kwargs?, KEY: [values]}``); ``datasets`` maps names to
    data dirs (or lists dirs). Nothing is written.
    """
    trainer_args = [
        str(a) for a in (shlex.split(trainer_args) if isinstance(trainer_args, str) else trainer_args)
    ]
    eval_args = [str(a) for a in (shlex.split(eval_args) if isinstance(eval_args, str) else eval_args)]
    if output is None:
        raise StudyError("no study folder: pass --output DIR (or output: in the grid file)")
    output = Path(output).expanduser().resolve()
    datasets = _datasets(datasets)
    try:
        base_config = resolve_config(base_config) if base_config is not None else None
    except ConfigError as e:
        raise StudyError(f"base config: {e}") from e
    trainer_config, base_kwargs = _trainer_config(base_config)
    rows = _method_rows(methods or [], base_kwargs) + _sweep_rows(sweep or [], base_kwargs)
    if not rows:
        raise StudyError("no methods: pass --methods or --sweep, or list them in the grid file")
    seen: dict[str, str] = {}
    for row in rows:
        slug = _slug(row.label)
        if slug in seen:
            raise StudyError(
                f"rows '{seen[slug]}' and '{row.label}' share a folder name: give them distinct labels"
            )
        seen[slug] = row.label
    baseline = _baseline_row(rows, baseline)
    seeds = [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds must be distinct and at least one, got {seeds}")
    if int(nproc_per_node) < 1:
        raise StudyError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if eval_checkpoint not in CHECKPOINTS:
        raise StudyError(
            f"--eval-checkpoint must be one of {', '.join(CHECKPOINTS)}, got {eval_checkpoint!r}"
        )
    _check_passthrough(trainer_parser(), trainer_args, TRAINER_OWNED, [], "trainer arguments")
    _check_passthrough(
        evaluate.build_parser(), eval_args, EVAL_OWNED, ["--checkpoint", "--data-dir"], "eval args"
    )

    nproc = int(nproc_per_node)
    launcher = [sys.executable, *TRAINER_MODULE]
    if nproc > 1:
        launcher[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    # What every cell shares; with a cell's own entries, its settings.
    shared = {
        "trainer_config": trainer_config,
        "trainer_args": trainer_args,
        "nproc_per_node": nproc,
        "eval_checkpoint": eval_checkpoint,
        "eval_args": eval_args,
    }
    cells = []
    # Seed by seed: a study stopped part way still has every method on its first seeds.
    for (dataset, data_dir), seed, row in itertools.product(datasets.items(), seeds, rows):
        folder = output / _slug(dataset) / _slug(row.label) / f"seed{seed}"
        calib = calib_split if calib_split and find_split(data_dir, [calib_split]) is not None else None
        settings = {
            "dataset": dataset,
            "data_dir": str(data_dir),
            "method": row.method,
            "method_kwargs": row.kwargs,
        }
        settings.update(seed=seed, calib_split=calib, **shared)
        config_file = folder / TRAINER_CONFIG if base_config is not None else None
        cells.append(
            Cell(
                dataset=dataset,
                data_dir=data_dir,
                row=row,
                seed=seed,
                dir=folder,
                calib_split=calib,
                settings=_json_normal(settings),
                trainer_config_file=config_file,
                launcher=tuple(launcher),
                trainer_argv=_trainer_argv(folder, config_file, trainer_args, data_dir, row, seed),
                eval_argv=_eval_argv(folder, eval_checkpoint, data_dir, calib, eval_args),
            )
        )
    return Study(
        output, datasets, rows, seeds, base_config, trainer_args, eval_args, calib_split, cells, baseline
    )


def _baseline_row(rows: list[Row], baseline: str | None) -> str:
    """The baseline's label: the first row, or the row ``baseline`` labels (or whose method it is, if
    only one row has that method)."""
    if baseline is None:
        return rows[0].label
    if any(r.label == baseline for r in rows):
        return baseline
    by_method = [r.label for r in rows if r.method == baseline]
    if len(by_method) == 1:
        return by_method[0]
    raise StudyError(
        f"--baseline {baseline!r} is not one row's label"
        + (f" (method {baseline} has rows {', '.join(by_method)})" if by_method else "")
        + f"; rows: {', '.join(r.label for r in rows)}"
    )


def _trainer_argv(folder: Path, config_file, trainer_args, data_dir: Path, row: Row, seed: int) -> tuple:
    kwargs_args = ["--method-kwargs", *(f"{k}={v}" for k, v in row.kwargs.items())] if row.kwargs else []
    return (
        *(["-c", str(config_file)] if config_file else []), *trainer_args, "--data-dir", str(data_dir),
        "--method", row.method, *kwargs_args, "--seed", str(seed), "--output", str(folder), "--experiment", TRAIN_DIR,
    )  # fmt: skip


def _eval_argv(folder: Path, checkpoint: str, data_dir: Path, calib: str | None, eval_args) -> tuple:
    return (
        sys.executable, "-m", "timm_cskd.evaluate", "--checkpoint", str(folder / TRAIN_DIR / CHECKPOINTS[checkpoint]),
        "--data-dir", str(data_dir), "--output", str(folder / EVAL_DIR), "--save-predictions",
        *(["--calib-split", calib] if calib else []), *eval_args,
    )  # fmt: skip


def load_grid(path) -> dict:
    """A grid YAML file (a path or a packaged grid's name) as ``plan_study`` keyword arguments; an unknown
    key names the closest valid one."""
    path = resolve_config(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise StudyError(f"cannot read the grid file {path}: {e}") from e
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping of {', '.join(GRID_KEYS)}")
    for key in raw:
        if key not in GRID_KEYS:
            close = difflib.get_close_matches(str(key), GRID_KEYS, n=1)
            raise StudyError(
                f"{path}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
            )
    return dict(raw)


# ---------------------------------------------------------------------------------------------- cells


def _read_record(cell: Cell) -> dict | None:
    path = cell.dir / CELL_RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StudyError(f"cell {cell.name}: cannot read {path}: {e}") from e


def _write_atomic(path: Path, text: str) -> None:
    """Readers (a second study on the folder) see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_record(cell: Cell, record: dict) -> None:
    _write_atomic(cell.dir / CELL_RECORD, json.dumps(record, indent=2))


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
    record = _read_record(cell)
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
def _locked(cell: Cell):
    """The cell's lock for the life of a run in it: a second study meets ``RunLockedError``."""
    cell.dir.mkdir(parents=True, exist_ok=True)
    with RunLock(cell.dir):
        yield


def _begin(cell: Cell, fresh: bool) -> dict:
    """Write the cell's ``trainer.yaml`` and its settings in ``cell.json`` (status ``running``) before
    anything runs in it. ``fresh`` (a rerun of changed settings) first drops the old evaluation and logs;
    the trainer's ``--overwrite`` drops its checkpoints under the trainer's own lock."""
    if fresh:
        shutil.rmtree(cell.eval_dir, ignore_errors=True)
        for name in (TRAIN_LOG, EVAL_LOG):
            (cell.dir / name).unlink(missing_ok=True)
    if cell.trainer_config_file is not None:
        _write_atomic(
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
    _write_record(cell, record)
    return record


@contextlib.contextmanager
def claim_cell(cell: Cell, fresh: bool = False):
    """Hold the cell (its lock) with its settings recorded, as the study does around a run in it; yields
    the record (``cell.json``'s content)."""
    with _locked(cell):
        yield _begin(cell, fresh)


@dataclass
class CellResult:
    """``status``: done, skipped (done before), failed, interrupted, busy or refused."""

    status: str
    seconds: float = 0.0
    message: str = ""
    log: Path | None = None
    log_tail: list[str] = field(default_factory=list)


class _Stop:
    """SIGTERM (a scheduler's notice, ``kill PID``) is passed on to the running trainer, which saves a
    checkpoint and exits; the study then starts nothing more."""

    def __init__(self):
        self.requested = False
        self.child: subprocess.Popen | None = None
        self._previous = None

    def __enter__(self):
        # Signal handlers can only be set from the main thread; elsewhere SIGTERM keeps its default.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _run_logged(command: list[str], log: Path, stop: _Stop) -> int:
    """Run ``command`` with its output appended to ``log`` (a resumed cell keeps its earlier attempts)."""
    # torchrun SIGKILLs its workers 30 s after passing on a SIGTERM unless told to wait: a trainer needs
    # up to --log-interval updates to notice, then a checkpoint save.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300")
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        f.flush()
        with subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env) as child:
            stop.child = child
            try:
                return child.wait()
            finally:
                stop.child = None


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
    _write_record(cell, record)
    message = (
        f"stopped during {stage}; the next run resumes it" if interrupted
        else f"{stage} failed with exit code {code}"
    )  # fmt: skip
    return CellResult(record["status"], time.monotonic() - start, message, log, record["log_tail"])


def run_cell(cell: Cell, *, overwrite: bool = False, stop: _Stop | None = None) -> CellResult:
    """Train (resuming what the cell holds) and evaluate one cell, holding its lock throughout."""
    stop = stop or _Stop()
    start = time.monotonic()
    try:
        with _locked(cell):
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
            record = _begin(cell, fresh)
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
            _write_record(cell, record)
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


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _recorded_seconds(cell: Cell) -> float | None:
    record = _read_record(cell) or {}
    return record.get("seconds") if record.get("status") == "done" else None


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
    durations = [s for s in map(_recorded_seconds, study.cells) if s]
    done = sum(state == "done" for state in states.values())
    print(f"study {study.output}: {total} cells, {done} done, {total - done} to run", flush=True)
    for line in _notes(study):
        print(line, flush=True)
    with _Stop() as stop:
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
                f", ETA {_hms(np.mean(durations) * to_run)} for {to_run} cell(s)"
                if durations and to_run
                else ""
            )
            detail = f" in {_hms(result.seconds)}" if result.seconds else ""
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


# ---------------------------------------------------------------------------------------------- summary


def _results(study: Study) -> tuple[list[tuple[Cell, dict]], list[tuple[Cell, str]]]:
    """The evaluated cells with their metrics, and the others with their status."""
    finished, incomplete = [], []
    for cell in study.cells:
        state, _ = cell_state(cell)
        if state == "done":
            finished.append((cell, json.loads((cell.eval_dir / "metrics.json").read_text())))
        else:
            status = (_read_record(cell) or {}).get("status", "not started")
            described = {"changed": "run with other settings", "unrecorded": "a run the study did not record"}
            incomplete.append((cell, described.get(state, INCOMPLETE.get(status, status))))
    return finished, incomplete


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _summed_bins(cells: list[Cell]) -> dict:
    bins = [load_bins(c.eval_dir / "reliability.json") for c in cells]
    return {
        key: np.sum([b[key] for b in bins], axis=0).tolist() for key in ("count", "conf_sum", "correct_sum")
    }


def _markdown(study: Study, tables: dict[str, list[str]], diagrams: dict[str, Path], incomplete) -> str:
    trainer = shlex.join(
        [*(["-c", str(study.base_config)] if study.base_config else []), *study.trainer_args]
    )  # fmt: skip
    legend = (
        "Each entry is the mean ± sample standard deviation (ddof=1) over the seeds (the mean alone with one "
        "seed). Errors, ECE, R@1 and the confidence gap are in percent. Top-1's parenthesis is the relative "
        f"change of its mean against the baseline's, {study.baseline or study.rows[0].label}. Bold: the best per column (the lowest; "
        "the highest R@1; the confidence gap closest to 0). The confidence gap is mean confidence minus "
        "accuracy: positive is over-confident."
    )
    if study.calib_split:
        legend += f" TS: after temperature scaling fitted on the `{study.calib_split}` split."
    checkpoint = CHECKPOINTS[study.cells[0].settings["eval_checkpoint"]]
    evaluation = f"`{checkpoint}`" + (f" with `{shlex.join(study.eval_args)}`" if study.eval_args else "")
    lines = [
        f"# Study {study.output.name}",
        "",
        f"Trainer: `timm-cskd train {trainer}`; evaluation of {evaluation}.",
        "",
        legend,
    ]
    for dataset, analysis in tables.items():
        lines += ["", f"## {dataset}", "", *analysis]
        if dataset in diagrams:
            lines += [
                "",
                f"![reliability diagram, {dataset}]({diagrams[dataset].name})",
                "",
                "Reliability diagram: each method's bins summed over its seeds (the legend's ECE is that of the "
                "pooled bins).",
            ]
    if incomplete:
        lines += [
            "",
            "## Incomplete cells",
            "",
            "| Dataset | Method | Seed | Status | Folder |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {c.dataset} | {c.row.label} | {c.seed} | {s} | `{c.dir}` |" for c, s in incomplete]
    return "\n".join(lines) + "\n"


def _write_timm_results(study: Study, finished: list[tuple[Cell, dict]]) -> Path:
    """``results.csv``: timm validate.py's results columns, a row per evaluated cell after its dataset,
    label, method and seed, so a study's runs merge with a timm user's tables."""
    rows = [
        {"dataset": c.dataset, "label": c.row.label, "method": c.row.method, "seed": c.seed, **results_row(m)}
        for c, m in finished
    ]
    return write_results(
        study.output / RESULTS_FILE, rows, columns=("dataset", "label", "method", "seed", *TIMM_COLUMNS)
    )


def summarise(study: Study) -> list[Path]:
    """Write ``study.json``, ``study.csv``, ``study.md`` and each dataset's ``reliability_<dataset>.png``
    from the cells evaluated so far; returns the files written."""
    finished, incomplete = _results(study)
    study.output.mkdir(parents=True, exist_ok=True)
    written = []

    # figures.read_study names each run by its "method": the row's label, unique where a sweep gives one
    # method several rows; method_name is the registry's name.
    cells = [
        {
            "dataset": c.dataset,
            "method": c.row.label,
            "seed": c.seed,
            "eval_dir": os.path.relpath(c.eval_dir, study.output),
            "method_name": c.row.method,
            "method_kwargs": c.row.kwargs,
            "cell_dir": os.path.relpath(c.dir, study.output),
        }
        for c, _ in finished
    ]
    pending = [
        {"dataset": c.dataset, "method": c.row.label, "seed": c.seed, "status": s, "cell_dir": os.path.relpath(c.dir, study.output)}
        for c, s in incomplete
    ]  # fmt: skip
    _write_atomic(
        study.output / "study.json",
        json.dumps(
            {
                "baseline": study.baseline,
                "calib_split": study.calib_split,
                "cells": cells,
                "incomplete": pending,
            },
            indent=2,
        ),
    )
    written.append(study.output / "study.json")

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "method", "label", "seed", "metric", "value"])
    for cell, metrics in finished:
        for key, value in _numeric(metrics).items():
            writer.writerow([cell.dataset, cell.row.method, cell.row.label, cell.seed, key, repr(value)])
    _write_atomic(study.output / "study.csv", buffer.getvalue())
    written.append(study.output / "study.csv")
    written.append(_write_timm_results(study, finished))

    tables, diagrams = {}, {}
    for dataset in study.datasets:
        runs = {
            row.label: [(c, m) for c, m in finished if c.dataset == dataset and c.row == row]
            for row in study.rows
        }
        rows = [(row.label, [m for _, m in runs[row.label]]) for row in study.rows if runs[row.label]]
        if not rows:
            continue
        tables[dataset] = analysis_lines(rows, study.baseline, study.calib_split)
        path = diagrams[dataset] = study.output / f"reliability_{_slug(dataset)}.png"
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        plot_reliability_overlay({label: _summed_bins([c for c, _ in runs[label]]) for label, _ in rows}, tmp)
        os.replace(tmp, path)
        written.append(path)
    _write_atomic(study.output / "study.md", _markdown(study, tables, diagrams, incomplete))
    written.append(study.output / "study.md")
    return written


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m timm_cskd.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--grid", default=None, help="YAML file describing the study; the flags below override it"
    )
    parser.add_argument("-c", "--config", default=None, help="base trainer config (YAML) of every cell")
    parser.add_argument("--data-dir", nargs="+", default=None, metavar="[NAME=]DIR", help="datasets")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD[:KEY=VALUE,...]")
    parser.add_argument(
        "--sweep",
        nargs="+",
        action="append",
        default=None,
        metavar="METHOD KEY=V1,V2",
        help="rows for every combination, e.g. --sweep cskd temperature=1,4 lambda=1,2,3,4 (repeatable)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--output", default=None, help="the study folder")
    parser.add_argument(
        "--calib-split",
        default=None,
        help="fit a temperature on this split where a dataset has it (e.g. calib)",
    )
    parser.add_argument(
        "--nproc-per-node", type=int, default=None, help="> 1: train each cell under torchrun"
    )
    parser.add_argument("--eval-args", default=None, help="quoted arguments for every timm_cskd.evaluate run")
    parser.add_argument("--eval-checkpoint", choices=tuple(CHECKPOINTS), default=None, help="default: last")
    parser.add_argument(
        "--baseline", default=None, help="the row (label) differences are taken against; default: the first"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rerun cells whose settings changed, from scratch"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the cells and their commands; run nothing"
    )
    parser.add_argument(
        "--figures", action="store_true", help="also draw timm_cskd.figures into <output>/figures"
    )
    return parser


def _cli_sweep(tokens: list[str]) -> dict:
    sweep = {"method": tokens[0]}
    for token in tokens[1:]:
        key, sep, values = token.partition("=")
        if not sep:
            raise StudyError(f"--sweep {shlex.join(tokens)}: expected KEY=V1,V2,..., got '{token}'")
        sweep[key] = values if key == "label" else [_literal(v) for v in values.split(",")]
    return sweep


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" belongs to the trainer, never to this parser.
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    try:
        grid = load_grid(args.grid) if args.grid else {}
        overrides = {
            "base_config": args.config,
            "datasets": args.data_dir,
            "methods": args.methods,
            "sweep": [_cli_sweep(t) for t in args.sweep] if args.sweep else None,
            "seeds": args.seeds,
            "output": args.output,
            "calib_split": args.calib_split,
            "nproc_per_node": args.nproc_per_node,
            "eval_args": args.eval_args,
            "eval_checkpoint": args.eval_checkpoint,
            "baseline": args.baseline,
        }
        grid.update({k: v for k, v in overrides.items() if v is not None})
        trainer_args = grid.pop("trainer_args", None) or []
        trainer_args = shlex.split(trainer_args) if isinstance(trainer_args, str) else list(trainer_args)
        if "datasets" not in grid:
            raise StudyError("no datasets: pass --data-dir DIR or list datasets in the grid file")
        study = plan_study(
            grid.pop("output", None),
            grid.pop("datasets"),
            trainer_args=trainer_args + argv[split + 1 :],
            **grid,
        )
        if args.dry_run:
            print_plan(study, overwrite=args.overwrite)
            return 0
        return run_study(study, overwrite=args.overwrite, figures=args.figures).exit_code
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
