"""The exported folder's model card: the metrics it reports (evaluate's metrics.json or the training run's
validation of the same weights), the dataset and ECE bins they were measured with, and the card itself
(huggingface_hub's ``ModelCard``, with ``model-index`` entries the hub reads)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from timm_cskd.checkpoint import CheckpointError, LoadedModel
from timm_cskd.hub import hub_name
from timm_cskd.metrics import DEFAULT_ECE_BINS

__all__ = ["card_dataset", "checkpoint_metrics", "ece_bins", "model_card", "read_metrics_file"]

METRIC_KEYS = ("top1_err", "top5_err", "ece", "nll", "brier", "recall_at_1", "num_samples")


def checkpoint_metrics(
    loaded: LoadedModel, checkpoint: Path, ema: bool, metrics_file: str | None
) -> dict | None:
    """Metrics for the card: an evaluate metrics.json if given, else the training run's validation of
    exactly these weights, the summary.csv row of the checkpoint's epoch (its ``ema_`` columns for --ema).
    None when no row matches (a checkpoint saved mid-epoch)."""
    if metrics_file is not None:
        return read_metrics_file(metrics_file)
    summary = checkpoint.parent / "summary.csv"
    if loaded.epoch is None or not checkpoint.is_file() or not summary.is_file():
        return None
    with open(summary, newline="") as f:
        # The last row of that epoch: a run killed between its summary row and its checkpoint trains
        # the epoch again on resume, and the checkpoint holds the weights of that second pass.
        rows = [r for r in csv.DictReader(f) if r.get("epoch") == str(loaded.epoch)]
    row = rows[-1] if rows else None
    if row is None:
        return None
    prefix = "eval_ema_" if ema else "eval_"
    metrics = {k.removeprefix(prefix): float(v) for k, v in row.items() if k.startswith(prefix) and v}
    if not ema:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("ema_")}
    return metrics or None


def ece_bins(metrics: dict | None, train_args: dict) -> int:
    """The bins the card's ECE was measured with: evaluate records them in metrics.json (one written
    before it did used evaluate's default); a training run's summary.csv used the run's --ece-bins."""
    metrics = metrics or {}
    if "ece_bins" in metrics:
        return int(metrics["ece_bins"])
    from_evaluate = "checkpoint" in metrics  # evaluate's metrics.json names what it evaluated
    return DEFAULT_ECE_BINS if from_evaluate else int(train_args.get("ece_bins") or DEFAULT_ECE_BINS)


def card_eval_metrics(bins: int) -> tuple[tuple[str, str], ...]:
    """model-index entries: metrics.json key, metric name on the hub."""
    return (
        ("top1_err", "Top-1 error (%)"),
        ("top5_err", "Top-5 error (%)"),
        ("ece", f"ECE, {bins} bins (%)"),
        ("nll", "NLL"),
    )


def card_dataset(
    loaded: LoadedModel, metrics_file: str | None, metrics: dict, dataset: str | None = None
) -> tuple[str, str | None]:
    """(dataset, split) the card's metrics were measured on: ``dataset`` if named, else the --data-dir
    folder name that evaluate recorded or the training run's; the split as evaluated or validated."""
    if metrics_file is not None:
        evaluated = metrics.get("evaluated") or {}
        return dataset or evaluated.get("dataset") or "unknown", evaluated.get("split")
    args = loaded.train_args or {}
    return dataset or Path(args.get("data_dir") or args.get("data") or "unknown").name, args.get("val_split")


def model_card(
    loaded: LoadedModel,
    name: str,
    metrics: dict | None,
    ema: bool,
    source: str = "",
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    dataset: tuple[str, str | None] = ("unknown", None),
) -> ModelCard:
    """The card: huggingface_hub's metadata (``model-index`` with the measured metrics, which the hub
    shows and parses; timm's ``generate_readme`` writes none), the recipe and the metrics table."""
    args = loaded.train_args or {}
    bins = ece_bins(metrics, args)
    dataset_name, split = dataset
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=key,
            metric_name=label,
            metric_value=float(metrics[key]),
        )
        for key, label in card_eval_metrics(bins)
        if metrics and key in metrics
    ]
    data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=["image-classification", "timm", "cs-kd"],
        model_name=repo_id or name,
        eval_results=eval_results or None,
    )
    load = f"'{hub_name(repo_id, revision)}'" if repo_id else "'local-dir:PATH'"
    lines = [
        f"# {repo_id or name}",
        "",
        f"A `{args.get('model', loaded.model.default_cfg.get('architecture'))}` trained with "
        f"[timm-cskd](https://arxiv.org/abs/2003.13964), method `{loaded.method or 'cskd'}`"
        + (
            " (Class-wise Self-Knowledge Distillation, Yun et al., CVPR 2020)"
            if (loaded.method or "cskd").startswith("cskd")
            else ""
        )
        + (", exponential moving average weights." if ema else "."),
        "",
        "```python",
        "import timm",
        f"model = timm.create_model({load}, pretrained=True)",
        "```",
    ]
    if args:
        recipe = [
            ("method", args.get("method", "cskd")),
            ("method hyper-parameters", ", ".join(f"{k}={v}" for k, v in (loaded.method_kwargs or {}).items()) or "-"),
            ("knowledge distillation", f"from {args['kd_model_name']}, T {args.get('kd_temperature')}" if args.get("kd_model_name") else "-"),
            ("epochs", args.get("epochs")),
            ("images per step", f"{args.get('batch_size')} per process"),
            ("optimizer", f"{args.get('opt')}, lr {args.get('lr')}, momentum {args.get('momentum')}, weight decay {args.get('weight_decay')}"),
            ("schedule", f"{args.get('sched')}" + (f", /{1 / args['decay_rate']:g} at epochs {args.get('decay_milestones')}" if args.get("sched") == "multistep" else "")),
            ("augmentation", f"random-resized-crop {args.get('img_size')} scale {args.get('scale')}, hflip {args.get('hflip')}, mixup {args.get('mixup')}, cutmix {args.get('cutmix')}, smoothing {args.get('smoothing')}"),
            ("precision", f"AMP {args.get('amp_dtype')}" if args.get("amp") else "float32"),
        ]  # fmt: skip
        lines += ["", "## Training recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in recipe]
    if metrics:
        names = [
            ("top1_err", "top-1 error (%)"),
            ("top5_err", "top-5 error (%)"),
            ("ece", f"ECE, {bins} bins (%)"),
            ("nll", "NLL"),
            ("brier", "Brier"),
            ("recall_at_1", "recall@1 (%)"),
            ("num_samples", "validation images"),
        ]
        lines += [
            "",
            "## Measured metrics",
            "",
            *([source, ""] if source else []),
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {label} | {metrics[key]:.4g} |" for key, label in names if key in metrics]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


def read_metrics_file(path: str | os.PathLike) -> dict:
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"--metrics {path}: not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"--metrics {path}: not a readable metrics.json ({e})") from e
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) for k, v in metrics.items() if k in METRIC_KEYS
    ):
        raise CheckpointError(
            f"--metrics {path}: expected timm_cskd.evaluate's metrics.json, a mapping of numbers"
        )
    return metrics
