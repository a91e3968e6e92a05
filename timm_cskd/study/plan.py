"""A study's plan: the grid file, and every cell (a row on one dataset with one seed) with the folder it
lives in, the settings that decide its result and the exact trainer and evaluation commands. Planning
checks everything it can without running anything, and writes nothing."""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from timm_cskd import evaluate
from timm_cskd.config import build_parser as trainer_parser
from timm_cskd.config import load_yaml_defaults, resolve_config
from timm_cskd.data.index import find_split
from timm_cskd.errors import ConfigError
from timm_cskd.methods import LEGACY_KWARGS
from timm_cskd.naming import slug
from timm_cskd.study.errors import StudyError
from timm_cskd.study.rows import Row, baseline_row, method_rows, sweep_rows

__all__ = ["CHECKPOINTS", "GRID_KEYS", "Cell", "Study", "load_grid", "plan_study"]

# The trainer as a module of the installed package (what train_imagenet.py and `timm-cskd train` run).
TRAINER_MODULE = ["-m", "timm_cskd.train"]
TRAINER_CONFIG = "trainer.yaml"
TRAIN_DIR, EVAL_DIR = "train", "eval"
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
    # Every cell would replace the same file; the study writes results.csv with a row per cell.
    "results_file": "the study's results.csv",
    "results_format": "the study's results.csv",
}


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
    rows = method_rows(methods or [], base_kwargs) + sweep_rows(sweep or [], base_kwargs)
    if not rows:
        raise StudyError("no methods: pass --methods or --sweep, or list them in the grid file")
    seen: dict[str, str] = {}
    for row in rows:
        folder = slug(row.label)
        if folder in seen:
            raise StudyError(
                f"rows '{seen[folder]}' and '{row.label}' share a folder name: give them distinct labels"
            )
        seen[folder] = row.label
    baseline = baseline_row(rows, baseline)
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
        folder = output / slug(dataset) / slug(row.label) / f"seed{seed}"
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
