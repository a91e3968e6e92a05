"""A study's analysis per dataset, as ``study.md`` carries it, from a study folder's ``study.csv``.

    python -m timm_cskd.study_report output/studies/fmnist50 [--baseline CE] [--output analysis.md]

For each dataset: the paper's table (mean ± std over seeds), each method's differences from the baseline
with Welch's t, and the calibration regime in words. It reads only ``study.csv`` (and the baseline that
``study.json`` names), so it runs anywhere the study folder was copied, without the data or the cells.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path

from timm_cskd.invocation import program_name
from timm_cskd.study.errors import ReportError
from timm_cskd.study.regime import regime_paragraph
from timm_cskd.study.tables import dataset_table, differences_legend, differences_table

__all__ = ["analysis_lines", "main", "read_results", "report"]


def analysis_lines(rows, baseline: str | None = None, calib_split: str | None = None) -> list[str]:
    """One dataset's tables and regime paragraph as markdown blocks (``rows``: ``[(label, [metrics,
    ...]), ...]`` in the study's row order)."""
    lines = [dataset_table(rows, baseline), "", differences_legend(rows, baseline)]
    table = differences_table(rows, baseline)
    lines += ["", table] if table else []
    return [*lines, "", regime_paragraph(rows, baseline, calib_split)]


def read_results(study_dir) -> tuple[dict[str, list[tuple[str, list[dict]]]], str | None, str | None]:
    """``{dataset: [(label, [metrics per seed, ...]), ...]}`` from ``study.csv`` (rows in the order the
    file first names them, seeds in increasing order), and the baseline and calibration split that
    ``study.json`` records (None where it records none)."""
    folder = Path(study_dir)
    path = folder / "study.csv"
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line in csv.DictReader(f):
                seeds = runs.setdefault(line["dataset"], {}).setdefault(line["label"], {})
                seeds.setdefault(int(line["seed"]), {})[line["metric"]] = float(line["value"])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ReportError(
            f"{path}: expected the study's csv (dataset, method, label, seed, metric, value): {e}"
        ) from e
    if not runs:
        raise ReportError(f"{path} holds no evaluated run")
    recorded = {}
    with contextlib.suppress(OSError, ValueError):  # no study.json: the first row is the baseline
        recorded = json.loads((folder / "study.json").read_text())
    results = {
        dataset: [(label, [seeds[s] for s in sorted(seeds)]) for label, seeds in labels.items()]
        for dataset, labels in runs.items()
    }
    return results, recorded.get("baseline") or None, recorded.get("calib_split") or None


def report(study_dir, baseline: str | None = None, calib_split: str | None = None) -> str:
    """The markdown analysis of every dataset of the study in ``study_dir``; ``baseline`` and
    ``calib_split`` default to those ``study.json`` records."""
    results, recorded_baseline, recorded_calib = read_results(study_dir)
    labels = {label for rows in results.values() for label, _ in rows}
    if baseline is not None and baseline not in labels:
        raise ReportError(
            f"--baseline {baseline!r} is no row of the study (rows: {', '.join(sorted(labels))})"
        )
    baseline, calib_split = baseline or recorded_baseline, calib_split or recorded_calib
    sections = []
    for dataset, rows in results.items():
        sections.append("\n".join([f"## {dataset}", "", *analysis_lines(rows, baseline, calib_split)]))
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.study_report"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="a study folder (holding study.csv)")
    parser.add_argument(
        "--baseline", default=None, help="the row label to compare with (default: the study's)"
    )
    parser.add_argument(
        "--calib-split",
        default=None,
        help="the split temperature scaling was fitted on (default: the study's)",
    )
    parser.add_argument("--output", default=None, help="write the markdown here instead of printing it")
    args = parser.parse_args(argv)
    try:
        text = report(args.study, args.baseline, args.calib_split)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0
