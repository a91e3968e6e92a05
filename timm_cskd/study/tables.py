"""A study's tables for one dataset: the paper's layout (mean ± std over seeds per method and metric) and
each method's differences from the baseline with Welch's t.

A dataset's runs are ``[(label, [metrics, ...]), ...]``: each row's label with one ``metrics.json`` dict
per seed, in the study's row order.
"""

from __future__ import annotations

import numpy as np

from timm_cskd.study.stats import ALPHA, Welch, welch

__all__ = [
    "COLUMNS",
    "baseline_label",
    "columns_for",
    "dataset_table",
    "differences",
    "differences_legend",
    "differences_table",
    "fmt_of",
    "mean_of",
]

# study.md's columns: metrics.json key, header, format, which value is best.
COLUMNS = [
    ("top1_err", "Top-1 err (%) ↓", "{:.2f}", "min"),
    ("top5_err", "Top-5 err (%) ↓", "{:.2f}", "min"),
    ("ece", "ECE (%) ↓", "{:.2f}", "min"),
    ("nll", "NLL ↓", "{:.3f}", "min"),
    ("recall_at_1", "R@1 (%) ↑", "{:.2f}", "max"),
    ("conf_gap", "Conf. gap (%)", "{:+.2f}", "zero"),
    ("ece_ts", "ECE, TS (%) ↓", "{:.2f}", "min"),
    ("nll_ts", "NLL, TS ↓", "{:.3f}", "min"),
]
OPTIONAL_COLUMNS = ("ece_ts", "nll_ts")  # only when some run was evaluated with --calib-split


def columns_for(rows) -> list[tuple[str, str, str, str]]:
    return [
        c for c in COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(c[0] in m for _, runs in rows for m in runs)
    ]


def fmt_of(key: str) -> str:
    return next(fmt for k, _, fmt, _ in COLUMNS if k == key)


def mean_of(runs: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the runs, None unless every run has it."""
    return float(np.mean([m[key] for m in runs])) if runs and all(key in m for m in runs) else None


def baseline_label(rows, baseline: str | None) -> str | None:
    """The baseline row's label: ``baseline`` when given, else the first row's."""
    return baseline if baseline is not None else (rows[0][0] if rows else None)


def _cell_text(values: list[float], fmt: str) -> tuple[str, float]:
    """``mean ± sample std`` (the mean alone for one seed), and the mean as displayed."""
    mean = float(np.mean(values))
    text = fmt.format(mean)
    if len(values) > 1:
        text += " ± " + fmt.replace("+", "").format(float(np.std(values, ddof=1)))
    return text, float(fmt.format(mean))


def dataset_table(rows, baseline: str | None = None) -> str:
    """One dataset's table: a row per method (each run's metrics over seeds), the best per column bold,
    top-1's relative change against the baseline row (the first row unless ``baseline`` names one)."""
    columns = columns_for(rows)
    shown: dict[str, dict[str, tuple[str, float]]] = {}
    for label, runs in rows:
        shown[label] = {
            key: _cell_text([m[key] for m in runs], fmt)
            for key, _, fmt, _ in columns
            if mean_of(runs, key) is not None
        }
    best = {}
    for key, _, _, rule in columns:
        means = [cells[key][1] for cells in shown.values() if key in cells and np.isfinite(cells[key][1])]
        if means:
            best[key] = {"min": min(means), "max": max(means), "zero": min(abs(v) for v in means)}[rule]
    baseline = baseline_label(rows, baseline)
    base_top1 = mean_of(dict(rows).get(baseline, []), "top1_err")
    lines = ["| Method | " + " | ".join(header for _, header, _, _ in columns) + " | Seeds |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for label, runs in rows:
        cells = []
        for key, _, _, rule in columns:
            if key not in shown[label]:
                cells.append("-")
                continue
            text, mean = shown[label][key]
            cell = f"**{text}**" if (abs(mean) if rule == "zero" else mean) == best[key] else text
            if key == "top1_err" and base_top1 is not None and base_top1 > 0 and label != baseline:
                cell += f" ({100 * (mean_of(runs, key) - base_top1) / base_top1:+.1f}%)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def differences(rows, baseline: str | None = None) -> dict[str, dict[str, Welch]]:
    """Every other row's Welch test against the baseline per metric that both have in every run."""
    baseline = baseline_label(rows, baseline)
    base_runs = dict(rows).get(baseline)
    if not base_runs:
        return {}
    result = {}
    for label, runs in rows:
        if label == baseline:
            continue
        result[label] = {
            key: welch([m[key] for m in runs], [m[key] for m in base_runs])
            for key, _, _, _ in columns_for(rows)
            if mean_of(runs, key) is not None and mean_of(base_runs, key) is not None
        }
    return result


def _difference_text(result: Welch, fmt: str) -> str:
    text = (fmt if "+" in fmt else fmt.replace("{:", "{:+", 1)).format(result.difference)
    if result.t is None:
        return text + (f" ({result.why_not})" if result.why_not != "one seed" else "")
    text += f" (t {result.t:+.1f}, {result.df:.1f} df)"
    return f"**{text}**" if result.significant else text


def differences_legend(rows, baseline: str | None = None) -> str:
    baseline = baseline_label(rows, baseline)
    if not dict(rows).get(baseline):
        return f"The baseline {baseline} has no evaluated run on this dataset yet: no differences."
    others = [len(runs) for label, runs in rows if label != baseline and runs]
    if not others:
        return f"Only the baseline {baseline} has evaluated runs on this dataset: no differences."
    text = (
        f"Differences from the baseline {baseline}: each method's mean minus {baseline}'s, in the table's "
        "units; in parentheses Welch's t (unequal variances) and its Welch-Satterthwaite degrees of freedom, "
        f"bold where |t| passes the two-sided {100 * ALPHA:g}% critical value for those degrees of freedom. "
        "Each entry is its own test, not corrected for the number of entries: where a method changes "
        f"nothing, about one entry in {round(1 / ALPHA)} is bold by chance."
    )
    if len(dict(rows)[baseline]) < 2 or all(n < 2 for n in others):
        return (
            f"Differences from the baseline {baseline}: each method's mean minus {baseline}'s. With one seed "
            "no significance can be read: these are differences of single runs, with no seed spread to "
            "measure them against."
        )
    if any(n < 2 for n in others):
        text += " A row with one seed shows its difference alone."
    return text


def differences_table(rows, baseline: str | None = None) -> str:
    """A row per method but the baseline: its difference from the baseline per metric, with Welch's t."""
    found = differences(rows, baseline)
    if not found:
        return ""
    columns = [c for c in columns_for(rows) if any(c[0] in by_key for by_key in found.values())]
    lines = ["| Method | " + " | ".join(header for _, header, _, _ in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for label, by_key in found.items():
        cells = [_difference_text(by_key[k], fmt) if k in by_key else "-" for k, _, fmt, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
