"""The CS-KD paper's analysis figures (Yun et al., CVPR 2020) from evaluated runs.

    python -m timm_cskd.figures out/ce/eval-val out/cskd/eval-val --names CE CS-KD --output figures
    python -m timm_cskd.figures studies/fine-grained --output figures     # a folder holding study.json

Each RUN_DIR is a ``timm_cskd.evaluate --save-predictions`` output folder (``predictions.npz`` and
``reliability.json``). Writes into the output folder:

    fig1b.png            Figure 1(b): the mean top-5 softmax scores (rank 1 to 5) of misclassified samples
    fig2_<method>.png    Figure 2: histograms of the log-probability of the predicted label and of the
                         ground-truth label on misclassified samples, the first run (the baseline: CE
                         in a study) against each other run, as the paper sets CE against CS-KD
    fig3.png             Figure 3: t-SNE of the penultimate features of a few classes, one panel per method
                         (scikit-learn: pip install 'timm-cskd[study]')
    fig5_<method>.png    Figure 5: a reliability diagram per method, and all of them in fig5_overlay.png

A study folder's ``study.json`` lists ``{"cells": [{"dataset", "method", "seed", "eval_dir"}, ...]}``
(``eval_dir`` relative to the study folder); figures are drawn per dataset, one run per method (its lowest
seed), into ``<output>/<dataset>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads
import numpy as np  # noqa: E402

from timm_cskd.invocation import program_name  # noqa: E402
from timm_cskd.naming import slug  # noqa: E402
from timm_cskd.reliability import load_bins, plot_reliability, plot_reliability_overlay  # noqa: E402

__all__ = [
    "FiguresError",
    "Predictions",
    "figures_for_runs",
    "figures_for_study",
    "load_predictions",
    "logprob_histograms",
    "misclassified_log_probs",
    "plot_logprob_histograms",
    "plot_top5_scores",
    "plot_tsne",
    "top5_scores",
    "tsne_embedding",
    "main",
]

DPI = 200
# Probabilities saved as float32 that underflowed to 0 count as the smallest normal float32.
PROB_FLOOR = float(np.finfo(np.float32).tiny)


class FiguresError(ValueError):
    """An input is unusable; the message names the file or run at fault."""


@dataclass
class Predictions:
    probs: np.ndarray
    labels: np.ndarray
    features: np.ndarray


def load_predictions(eval_dir: str | os.PathLike) -> Predictions:
    path = Path(eval_dir) / "predictions.npz"
    if not path.is_file():
        raise FiguresError(f"{path} not found (run python -m timm_cskd.evaluate with --save-predictions)")
    with np.load(path) as data:
        missing = {"probs", "labels", "features"} - set(data.files)
        if missing:
            raise FiguresError(f"{path} lacks {', '.join(sorted(missing))}")
        probs, labels, features = data["probs"], data["labels"], data["features"]
    n = len(labels)
    if probs.ndim != 2 or labels.ndim != 1 or features.ndim != 2 or len(probs) != n or len(features) != n:
        raise FiguresError(
            f"{path}: expected probs (N, C), labels (N,), features (N, D), got "
            f"{probs.shape}, {labels.shape}, {features.shape}"
        )
    return Predictions(probs, labels.astype(np.int64), features)


def _misclassified(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    wrong = probs.argmax(axis=1) != labels
    if not wrong.any():
        raise FiguresError("no misclassified samples")
    return wrong


def top5_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Figure 1(b): the softmax scores of ranks 1..5 (sorted, highest first) averaged over the
    misclassified samples; fewer ranks when there are fewer than 5 classes."""
    wrong = _misclassified(probs, labels)
    k = min(5, probs.shape[1])
    return -np.sort(-probs[wrong], axis=1)[:, :k].mean(axis=0)


def misclassified_log_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Figure 2: log-probabilities of the predicted label and of the ground-truth label, per
    misclassified sample."""
    wrong = _misclassified(probs, labels)
    log_probs = np.log(np.maximum(probs[wrong].astype(np.float64), PROB_FLOOR))
    predicted = log_probs.max(axis=1)
    ground_truth = log_probs[np.arange(len(log_probs)), labels[wrong]]
    return predicted, ground_truth


def logprob_histograms(runs: dict[str, Predictions], bins: int = 30) -> dict:
    """Figure 2's histograms: per panel (``predicted``, ``ground_truth``) shared bin ``edges`` and each
    run's ``counts`` of misclassified samples per bin."""
    values = {name: misclassified_log_probs(run.probs, run.labels) for name, run in runs.items()}
    panels = {}
    for i, panel in enumerate(("predicted", "ground_truth")):
        edges = np.histogram_bin_edges(np.concatenate([v[i] for v in values.values()]), bins=bins)
        panels[panel] = {
            "edges": edges,
            "counts": {name: np.histogram(v[i], bins=edges)[0] for name, v in values.items()},
        }
    return panels


def _tsne_class():
    try:
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise ImportError(
            "Figure 3 (t-SNE) needs scikit-learn: pip install 'timm-cskd[study]' (or scikit-learn)"
        ) from e
    return TSNE


def tsne_embedding(
    features: np.ndarray,
    labels: np.ndarray,
    classes: list[int],
    per_class: int | None = 200,
    seed: int = 0,
    perplexity: float = 30.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Figure 3: a 2-D t-SNE (scikit-learn, ``random_state=seed``) of the samples of ``classes``, at most
    ``per_class`` of each drawn with ``seed``; returns (embedding (n, 2), labels (n,))."""
    TSNE = _tsne_class()
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            raise FiguresError(f"class {c} has no samples")
        if per_class is not None and len(members) > per_class:
            members = np.sort(np.random.default_rng([seed, c]).choice(members, per_class, replace=False))
        chosen.append(members)
    chosen = np.concatenate(chosen)
    if len(chosen) < 4:
        raise FiguresError(f"t-SNE needs at least 4 samples, classes {classes} have {len(chosen)}")
    # sklearn requires perplexity < n; about n/3 keeps each point's 3 * perplexity neighbours available.
    perplexity = min(perplexity, max((len(chosen) - 1) / 3, 1.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(features[chosen].astype(np.float64)), labels[chosen]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_top5_scores(
    scores: dict[str, np.ndarray], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Grouped bars: for each rank, one bar per method with its ``top5_scores``."""
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ranks = np.arange(1, max(len(s) for s in scores.values()) + 1)
    width = 0.8 / len(scores)
    for i, (name, values) in enumerate(scores.items()):
        x = ranks[: len(values)] + (i - (len(scores) - 1) / 2) * width
        bars = ax.bar(x, values, width=width, label=name, edgecolor="black")
        if len(scores) <= 4:  # more bars leave no room for readable values
            ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=1)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank of the softmax score")
    ax.set_ylabel("average softmax score")
    ax.set_ylim(0, 1)
    ax.set_title(title or "Top-5 softmax scores of misclassified samples")
    ax.legend()
    return _save(fig, Path(path))


def plot_logprob_histograms(histograms: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Two panels of ``logprob_histograms``' counts, the methods overlaid."""
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    labels = {"predicted": "(a) predicted label", "ground_truth": "(b) ground-truth label"}
    for ax, (panel, data) in zip(axes, histograms.items()):
        for name, counts in data["counts"].items():
            ax.stairs(counts, data["edges"], fill=True, alpha=0.45, label=f"{name} ({counts.sum()} samples)")
        ax.set_xlabel("log-probability")
        ax.set_ylabel("misclassified samples")
        ax.set_title(labels[panel])
        ax.legend()
    fig.suptitle(title or "Log-probabilities on misclassified samples")
    return _save(fig, Path(path))


def plot_tsne(
    embeddings: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str | None = None
) -> Path:
    """One scatter panel per method of ``tsne_embedding``'s points, coloured by class, five per row."""
    columns = min(len(embeddings), 5)
    rows = -(-len(embeddings) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4.5 * rows), squeeze=False)
    classes = sorted({int(c) for _, labels in embeddings.values() for c in labels})
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (name, (points, labels)) in zip(axes.flat, embeddings.items()):
        for i, c in enumerate(classes):
            mine = labels == c
            ax.scatter(*points[mine].T, s=8, color=colours(i % colours.N), label=f"class {c}")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(embeddings) :]:
        ax.set_axis_off()
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", markerscale=2)
    fig.suptitle(title or "t-SNE of penultimate features")
    return _save(fig, Path(path))


def figures_for_runs(
    runs: dict[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    tsne_classes: list[int] | None = None,
    tsne_per_class: int | None = 200,
    seed: int = 0,
    title: str | None = None,
) -> list[Path]:
    """Figures 1(b), 2, 3 and 5 for ``runs`` (method name -> evaluate output folder) into ``out_dir``.

    Every number is computed before the first file is written, so a bad run leaves no partial figure set.
    ``tsne_classes`` defaults to the first 10 classes (fewer if there are fewer).
    """
    loaded, bins = {}, {}
    for name, eval_dir in runs.items():
        loaded[name] = load_predictions(eval_dir)
        bins_file = Path(eval_dir) / "reliability.json"
        if not bins_file.is_file():
            raise FiguresError(f"{bins_file} not found (written by python -m timm_cskd.evaluate)")
        bins[name] = load_bins(bins_file)
    if tsne_classes is None:
        tsne_classes = sorted(int(c) for c in np.unique(next(iter(loaded.values())).labels))[:10]
    scores, embeddings = {}, {}
    for name, run in loaded.items():
        try:
            scores[name] = top5_scores(run.probs, run.labels)
            embeddings[name] = tsne_embedding(run.features, run.labels, tsne_classes, tsne_per_class, seed)
        except FiguresError as e:
            raise FiguresError(f"{name} ({runs[name]}): {e}") from e
    # Ten overlaid histograms are unreadable; the paper sets two methods side by side.
    baseline, *others = loaded
    histograms = {
        other: logprob_histograms({name: loaded[name] for name in dict.fromkeys([baseline, other])})
        for other in others or [baseline]
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def heading(text: str) -> str:
        return f"{title}: {text}" if title else text[0].upper() + text[1:]

    written = [
        plot_top5_scores(scores, out / "fig1b.png", heading("top-5 softmax scores of misclassified samples"))
    ]
    for other, pair in histograms.items():
        versus = f", {baseline} vs {other}" if other != baseline else ""
        written.append(
            plot_logprob_histograms(
                pair,
                out / f"fig2_{slug(other)}.png",
                heading(f"log-probabilities on misclassified samples{versus}"),
            )
        )
    written.append(plot_tsne(embeddings, out / "fig3.png", heading("t-SNE of penultimate features")))
    for name, run_bins in bins.items():
        path = out / f"fig5_{slug(name)}.png"
        plot_reliability(run_bins, path, title=f"{title}: {name}" if title else name, dpi=DPI)
        written.append(path)
    plot_reliability_overlay(bins, out / "fig5_overlay.png", dpi=DPI)
    written.append(out / "fig5_overlay.png")
    return written


def read_study(study_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """dataset -> {method: eval folder of its lowest seed}, in the order study.json first names them."""
    path = Path(study_dir) / "study.json"
    try:
        cells = json.loads(path.read_text())["cells"]
        datasets: dict[str, dict[str, tuple[int, Path]]] = {}
        for cell in cells:
            methods = datasets.setdefault(str(cell["dataset"]), {})
            method, seed, eval_dir = (
                str(cell["method"]),
                int(cell["seed"]),
                Path(study_dir) / cell["eval_dir"],
            )
            if method not in methods or seed < methods[method][0]:
                methods[method] = (seed, eval_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FiguresError(
            f"{path}: expected {{'cells': [{{'dataset', 'method', 'seed', 'eval_dir'}}, ...]}} ({type(e).__name__}: {e})"
        ) from e
    if not datasets:
        raise FiguresError(f"{path} lists no cells")
    return {dataset: {m: d for m, (_, d) in methods.items()} for dataset, methods in datasets.items()}


def figures_for_study(study_dir: str | os.PathLike, out_dir: str | os.PathLike, **options) -> list[Path]:
    """``figures_for_runs`` per dataset of a study into ``out_dir/<dataset>/``."""
    written = []
    for dataset, runs in read_study(study_dir).items():
        written += figures_for_runs(runs, Path(out_dir) / slug(dataset), title=dataset, **options)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.figures"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", help="evaluate output folders, or one folder holding study.json")
    parser.add_argument("--names", nargs="+", default=None, help="one label per run (default: folder names)")
    parser.add_argument("--output", default="figures", help="folder for the PNG files")
    parser.add_argument(
        "--tsne-classes",
        nargs="+",
        type=int,
        default=None,
        help="labels shown in Figure 3 (default: first 10)",
    )
    parser.add_argument(
        "--tsne-per-class", type=int, default=200, help="samples per class in Figure 3 (0: all of them)"
    )
    parser.add_argument("--seed", type=int, default=0, help="t-SNE's random_state and the per-class draw")
    args = parser.parse_args(argv)
    options = {
        "tsne_classes": args.tsne_classes,
        "tsne_per_class": args.tsne_per_class or None,
        "seed": args.seed,
    }
    study = len(args.runs) == 1 and (Path(args.runs[0]) / "study.json").is_file()
    try:
        if study:
            if args.names:
                raise FiguresError("--names does not apply to a study folder: study.json names the methods")
            written = figures_for_study(args.runs[0], args.output, **options)
        else:
            if args.names is not None and len(args.names) != len(args.runs):
                raise FiguresError(f"{len(args.names)} --names for {len(args.runs)} runs")
            folders = [Path(r) for r in args.runs]
            names = args.names or [f.parent.name if f.name.startswith("eval") else f.name for f in folders]
            if len(set(names)) != len(names):
                raise FiguresError(f"run names must differ, got {names}: pass --names")
            written = figures_for_runs(dict(zip(names, folders)), args.output, **options)
    except (FiguresError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
