"""timm ``validate.py``'s results file (``--results-file``, ``--results-format csv|json``) from our metrics.

timm's row is ``model, top1, top1_err, top5, top5_err, param_count, img_size, crop_pct, interpolation``
(accuracies and errors in percent rounded to 4 places, ``param_count`` in millions rounded to 2), as
pytorch-image-models ``validate.py`` writes it; our calibration and retrieval metrics follow in our
units (``metrics.json``'s). timm writes the file fresh (mode ``"w"``), and so do we, but atomically: a
reader sees the old file or the new one, and a failed write leaves the old one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from timm_cskd.atomic import write_atomic

__all__ = ["FORMATS", "TIMM_COLUMNS", "evaluated_setup", "results_row", "write_results"]

FORMATS = ("csv", "json")
TIMM_COLUMNS = (
    "model",
    "top1",
    "top1_err",
    "top5",
    "top5_err",
    "param_count",
    "img_size",
    "crop_pct",
    "interpolation",
)
OUR_COLUMNS = ("nll", "ece", "brier", "conf_gap", "recall_at_1", "num_samples")
TEMPERATURE_COLUMNS = ("temperature", "nll_ts", "ece_ts", "conf_gap_ts")


def evaluated_setup(model, data_config: dict, architecture: str, dataset: str, split: str) -> dict:
    """What timm's row says about the evaluated model besides its accuracy: recorded in metrics.json
    (under ``evaluated``) so a study can write the row later from the metrics alone."""
    return {
        "model": architecture,
        "param_count": sum(p.numel() for p in model.parameters()),
        "img_size": int(data_config["input_size"][-1]),
        "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
        "dataset": dataset,
        "split": split,
    }


def results_row(metrics: dict) -> dict:
    """One timm results row from an evaluate ``metrics.json`` dict (its errors are in percent). A
    metrics.json written before ``evaluated`` was recorded leaves those columns empty."""
    setup = metrics.get("evaluated") or {}
    row = {"model": setup.get("model", "")}
    for k in (1, 5):
        err = metrics[f"top{k}_err"]
        row[f"top{k}"] = round(100 - err, 4)
        row[f"top{k}_err"] = round(err, 4)
    params = setup.get("param_count")
    row["param_count"] = round(params / 1e6, 2) if params is not None else ""
    for key in ("img_size", "crop_pct", "interpolation"):
        row[key] = setup.get(key, "")
    row.update({key: metrics[key] for key in OUR_COLUMNS if key in metrics})
    row.update({key: metrics[key] for key in TEMPERATURE_COLUMNS if key in metrics})
    return row


def write_results(
    path: str | os.PathLike, results: dict | list[dict], fmt: str = "csv", columns: tuple[str, ...] = ()
) -> Path:
    """timm's ``write_results``: a dict or a list of rows as CSV (header ``columns``, then the rows' other
    keys in first-seen order, so rows with and without temperature scaling share one file) or as JSON."""
    path = Path(path)
    if fmt == "json":
        text = json.dumps(results, indent=4)
    else:
        rows = results if isinstance(results, list | tuple) else [results]
        columns = list(dict.fromkeys([*columns, *(key for row in rows for key in row)]))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path
