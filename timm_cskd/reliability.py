"""Reliability diagrams with their confidence histograms (Guo et al. 2017, Figure 1; the CS-KD paper's
Figure 5): accuracy per confidence bin on top, the number of images per bin underneath on the same axis.

Bins are ``{"count", "conf_sum", "correct_sum"}`` lists over equal-width confidence bins, as
``ClassificationMeter.bins()`` accumulates them and ``reliability.json`` stores them. A bin holding fewer
than ``min_count`` images is drawn faint, and an overlay's curve does not pass through it: one or two
images give an accuracy of 0 or 1 that says nothing about the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads
import numpy as np  # noqa: E402

__all__ = [
    "MIN_COUNT",
    "ReliabilityCurve",
    "bins_to_dict",
    "load_bins",
    "plot_reliability",
    "plot_reliability_overlay",
    "reliability_curve",
    "reliability_figure",
    "reliability_overlay_figure",
]

# A bin of n images measures its accuracy with a standard error up to 0.5 / sqrt(n): 0.16 at n = 10.
MIN_COUNT = 10
FAINT = 0.25  # the alpha of bins below the minimum count


def bins_to_dict(count, conf_sum, correct_sum) -> dict[str, list[float]]:
    return {
        "count": [float(v) for v in count],
        "conf_sum": [float(v) for v in conf_sum],
        "correct_sum": [float(v) for v in correct_sum],
    }


def load_bins(path: str | os.PathLike) -> dict[str, list[float]]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class ReliabilityCurve:
    """What a diagram draws for one run: per bin its centre, count, accuracy and mean confidence, whether
    it holds any image (``filled``) and at least ``min_count`` (``reliable``); the ECE of all bins."""

    centres: np.ndarray
    width: float
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    filled: np.ndarray
    reliable: np.ndarray
    ece: float
    min_count: int

    @property
    def sparse(self) -> np.ndarray:
        return self.filled & ~self.reliable


def reliability_curve(bins: dict, min_count: int = MIN_COUNT) -> ReliabilityCurve:
    count = np.asarray(bins["count"], dtype=float)
    conf_sum, correct_sum = np.asarray(bins["conf_sum"], float), np.asarray(bins["correct_sum"], float)
    filled = count > 0
    accuracy = np.divide(correct_sum, count, out=np.zeros_like(count), where=filled)
    confidence = np.divide(conf_sum, count, out=np.zeros_like(count), where=filled)
    num_bins = len(count)
    return ReliabilityCurve(
        centres=np.linspace(0.0, 1.0, num_bins + 1)[:-1] + 0.5 / num_bins,
        width=1.0 / num_bins,
        count=count,
        accuracy=accuracy,
        confidence=confidence,
        filled=filled,
        reliable=filled & (count >= min_count),
        ece=float(np.abs(conf_sum - correct_sum).sum() / count.sum()),
        min_count=min_count,
    )


def _axes(width: float):
    fig, (acc_ax, hist_ax) = plt.subplots(
        2, 1, figsize=(width, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    acc_ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    acc_ax.set_xlim(0, 1)
    acc_ax.set_ylim(0, 1)
    acc_ax.set_ylabel("accuracy")
    hist_ax.set_yscale("log")
    hist_ax.set_xlabel("confidence")
    hist_ax.set_ylabel("images per bin")
    return fig, acc_ax, hist_ax


def _min_count_line(hist_ax, min_count: int) -> None:
    hist_ax.axhline(min_count, color="gray", linestyle=":", linewidth=1, label=f"{min_count} images")


def reliability_figure(bins: dict, title: str | None = None, min_count: int = MIN_COUNT):
    """One run's diagram: accuracy bars per bin with the gap to the diagonal shaded, the counts below
    (bins under ``min_count`` faint). Returns the figure and the curve it draws."""
    curve = reliability_curve(bins, min_count)
    fig, acc_ax, hist_ax = _axes(4.5)
    for mask, alpha, suffix in ((curve.reliable, 1.0, ""), (curve.sparse, FAINT, f" (< {min_count} images)")):
        if not mask.any():
            continue
        x, acc = curve.centres[mask], curve.accuracy[mask]
        acc_ax.bar(
            x,
            acc,
            width=curve.width,
            edgecolor="black",
            color="tab:blue",
            alpha=alpha,
            label="accuracy" + suffix,
        )
        acc_ax.bar(
            x,
            np.abs(x - acc),
            bottom=np.minimum(acc, x),
            width=curve.width,
            edgecolor="tab:red",
            color="tab:red",
            alpha=0.3 * alpha,
            hatch="//",
            label="gap" + suffix,
        )
        hist_ax.bar(x, curve.count[mask], width=curve.width, edgecolor="black", color="tab:blue", alpha=alpha)
    total = curve.count.sum()
    for value, style, name in (
        (float(np.asarray(bins["correct_sum"], float).sum() / total), "-", "accuracy"),
        (float(np.asarray(bins["conf_sum"], float).sum() / total), "--", "mean confidence"),
    ):
        hist_ax.axvline(value, color="black", linestyle=style, linewidth=1, label=name)
    _min_count_line(hist_ax, min_count)
    acc_ax.set_title(
        f"{title + chr(10) if title else ''}ECE = {100 * curve.ece:.2f}% ({len(curve.count)} bins)"
    )
    acc_ax.legend(loc="upper left", fontsize="small")
    hist_ax.legend(loc="upper left", fontsize="x-small")
    fig.tight_layout()
    return fig, curve


def plot_reliability(
    bins: dict, path: str | os.PathLike, title: str | None = None, dpi: int = 120, min_count: int = MIN_COUNT
) -> float:
    """``reliability_figure`` saved to ``path``; returns the ECE in percent, which the title shows."""
    fig, curve = reliability_figure(bins, title, min_count)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return 100 * curve.ece


def reliability_overlay_figure(
    runs: dict[str, dict], min_count: int = MIN_COUNT, title: str = "Reliability diagram"
):
    """Several runs in one diagram: each run's accuracy against mean confidence through its bins of at
    least ``min_count`` images (the sparser ones faint, off the line), its counts per bin below. Returns
    the figure and the curves it draws."""
    fig, acc_ax, hist_ax = _axes(5.5)
    curves = {}
    for i, (name, bins) in enumerate(runs.items()):
        curve = curves[name] = reliability_curve(bins, min_count)
        colour = f"C{i}"
        acc_ax.plot(
            curve.confidence[curve.reliable],
            curve.accuracy[curve.reliable],
            "o-",
            color=colour,
            label=f"{name} (ECE {100 * curve.ece:.2f}%)",
        )
        acc_ax.plot(
            curve.confidence[curve.sparse],
            curve.accuracy[curve.sparse],
            "o",
            color=colour,
            alpha=FAINT,
            linestyle="none",
        )
        edges = np.append(curve.centres - curve.width / 2, 1.0)
        hist_ax.stairs(np.where(curve.filled, curve.count, np.nan), edges, color=colour)
    _min_count_line(hist_ax, min_count)
    acc_ax.set_title(f"{title}\nfaint: bins of fewer than {min_count} images")
    acc_ax.legend(loc="upper left", fontsize="small")
    hist_ax.legend(loc="upper left", fontsize="x-small")
    fig.tight_layout()
    return fig, curves


def plot_reliability_overlay(
    runs: dict[str, dict], path: str | os.PathLike, dpi: int = 120, min_count: int = MIN_COUNT
) -> None:
    """``reliability_overlay_figure`` saved to ``path``."""
    fig, _ = reliability_overlay_figure(runs, min_count)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
