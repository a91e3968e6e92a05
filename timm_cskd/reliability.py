"""Reliability diagrams and confidence histograms (Guo et al. 2017; the CS-KD paper's Figure 5).

Bins are ``{"count", "conf_sum", "correct_sum"}`` lists over equal-width confidence bins, as
``ClassificationMeter.bins()`` accumulates them and ``reliability.json`` stores them.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads
import numpy as np  # noqa: E402

__all__ = ["bins_to_dict", "load_bins", "plot_reliability", "plot_reliability_overlay"]


def bins_to_dict(count, conf_sum, correct_sum) -> dict[str, list[float]]:
    return {
        "count": [float(v) for v in count],
        "conf_sum": [float(v) for v in conf_sum],
        "correct_sum": [float(v) for v in correct_sum],
    }


def load_bins(path: str | os.PathLike) -> dict[str, list[float]]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _arrays(bins):
    count = np.asarray(bins["count"], dtype=float)
    filled = count > 0
    acc = np.divide(bins["correct_sum"], count, out=np.zeros_like(count), where=filled)
    conf = np.divide(bins["conf_sum"], count, out=np.zeros_like(count), where=filled)
    ece = float(np.abs(np.asarray(bins["conf_sum"]) - np.asarray(bins["correct_sum"])).sum() / count.sum())
    return count, acc, conf, filled, ece


def plot_reliability(bins: dict, path: str | os.PathLike, title: str | None = None, dpi: int = 120) -> float:
    """Confidence histogram over a reliability diagram (accuracy per bin, the gap to the diagonal
    shaded); returns the ECE in percent, which the title shows."""
    count, acc, conf, filled, ece = _arrays(bins)
    num_bins = len(count)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    centres, width = edges[:-1] + 0.5 / num_bins, 1.0 / num_bins
    fig, (hist_ax, rel_ax) = plt.subplots(2, 1, figsize=(4.5, 7.0), gridspec_kw={"height_ratios": [1, 2]})
    hist_ax.bar(centres, count / count.sum(), width=width, edgecolor="black", color="tab:blue")
    hist_ax.set_ylabel("fraction of samples")
    hist_ax.set_xlim(0, 1)
    hist_ax.set_title(f"{title + chr(10) if title else ''}ECE = {100 * ece:.2f}% ({num_bins} bins)")
    rel_ax.bar(
        centres[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy"
    )
    gap_bottom = np.minimum(acc, centres)[filled]
    gap_height = np.abs(centres - acc)[filled]
    rel_ax.bar(
        centres[filled],
        gap_height,
        bottom=gap_bottom,
        width=width,
        edgecolor="tab:red",
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="gap",
    )
    rel_ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    rel_ax.set_xlim(0, 1)
    rel_ax.set_ylim(0, 1)
    rel_ax.set_xlabel("confidence")
    rel_ax.set_ylabel("accuracy")
    rel_ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return 100 * ece


def plot_reliability_overlay(runs: dict[str, dict], path: str | os.PathLike, dpi: int = 120) -> None:
    """Accuracy against mean confidence per filled bin for several runs in one diagram."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for name, bins in runs.items():
        _, acc, conf, filled, ece = _arrays(bins)
        ax.plot(conf[filled], acc[filled], "o-", label=f"{name} (ECE {100 * ece:.2f}%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
