"""A study's summaries, from the cells evaluated so far: ``study.json`` (for ``timm_cskd.figures``),
``study.csv`` (a row per run and metric), ``results.csv`` (timm validate.py's results columns),
``study.md`` (the paper's tables and the calibration regime, as ``timm_cskd.study_report`` writes them)
and each dataset's ``reliability_<dataset>.png``."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
from pathlib import Path

import numpy as np

from timm_cskd.atomic import atomic_path, write_atomic
from timm_cskd.naming import slug
from timm_cskd.reliability import load_bins, plot_reliability_overlay
from timm_cskd.results import TIMM_COLUMNS, results_row, write_results
from timm_cskd.study.cells import INCOMPLETE, cell_state, read_record
from timm_cskd.study.plan import CHECKPOINTS, Cell, Study
from timm_cskd.study.report import analysis_lines

__all__ = ["RESULTS_FILE", "summarise"]

RESULTS_FILE = "results.csv"


def _results(study: Study) -> tuple[list[tuple[Cell, dict]], list[tuple[Cell, str]]]:
    """The evaluated cells with their metrics, and the others with their status."""
    finished, incomplete = [], []
    for cell in study.cells:
        state, _ = cell_state(cell)
        if state == "done":
            finished.append((cell, json.loads((cell.eval_dir / "metrics.json").read_text())))
        else:
            status = (read_record(cell) or {}).get("status", "not started")
            described = {"changed": "run with other settings", "unrecorded": "a run the study did not record"}
            incomplete.append((cell, described.get(state, INCOMPLETE.get(status, status))))
    return finished, incomplete


def _numeric(metrics: dict) -> dict[str, float]:
    settings = ("ece_bins",)  # how a metric was measured, not a metric
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in settings
    }


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
    write_atomic(
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
    write_atomic(study.output / "study.csv", buffer.getvalue())
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
        path = diagrams[dataset] = study.output / f"reliability_{slug(dataset)}.png"
        with atomic_path(path, suffix=".tmp.png") as tmp:  # matplotlib picks the format by the suffix
            plot_reliability_overlay(
                {label: _summed_bins([c for c, _ in runs[label]]) for label, _ in rows}, tmp
            )
        written.append(path)
    write_atomic(study.output / "study.md", _markdown(study, tables, diagrams, incomplete))
    written.append(study.output / "study.md")
    return written
